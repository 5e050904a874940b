//! I/O devices and their per-core channels (SPDK's `io_device`/`io_channel`).
//!
//! An I/O device is anything with per-core state: a uring bdev's ring, a cow
//! job's per-core tracking. [`get_io_channel`] returns this core's channel
//! for a device, creating it on first use and sharing it with every later
//! caller on the same core. The channel is destroyed when the last handle on
//! that core is dropped. Channels are `!Send`: each core owns its own, so the
//! data path needs no lock to use one.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Deref;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};

/// Identity of an I/O device, unique for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoDeviceId(u64);

impl IoDeviceId {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        IoDeviceId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for IoDeviceId {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    static CHANNELS: RefCell<HashMap<IoDeviceId, Weak<dyn Any>>> = RefCell::new(HashMap::new());
}

/// This core's channel for one device. Clones share it.
pub struct IoChannel<T: 'static>(Rc<T>);

impl<T> Clone for IoChannel<T> {
    fn clone(&self) -> Self {
        IoChannel(self.0.clone())
    }
}

impl<T> Deref for IoChannel<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> IoChannel<T> {
    /// Handles to this channel on this core.
    pub fn ref_count(this: &Self) -> usize {
        Rc::strong_count(&this.0)
    }
}

/// Gets this core's channel for `device`, creating it with `create` if the
/// core has none yet. Use interior mutability (`RefCell`/`Cell`) in `T`.
pub fn get_io_channel<T: 'static>(device: IoDeviceId, create: impl FnOnce() -> T) -> IoChannel<T> {
    CHANNELS.with(|map| {
        let mut map = map.borrow_mut();
        if let Some(existing) = map.get(&device).and_then(Weak::upgrade) {
            if let Ok(ch) = existing.downcast::<T>() {
                return IoChannel(ch);
            }
        }
        let ch = Rc::new(create());
        let erased: Rc<dyn Any> = ch.clone();
        map.insert(device, Rc::downgrade(&erased));
        map.retain(|_, w| w.strong_count() > 0);
        IoChannel(ch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn one_channel_per_core_per_device() {
        let dev = IoDeviceId::new();
        let created = Rc::new(Cell::new(0));
        let mk = || {
            created.set(created.get() + 1);
            Cell::new(0u32)
        };
        let a = get_io_channel(dev, mk);
        let b = get_io_channel::<Cell<u32>>(dev, || {
            unreachable!("second get shares the first channel")
        });
        a.set(5);
        assert_eq!(b.get(), 5);
        assert_eq!(IoChannel::ref_count(&a), 2);
        let other = get_io_channel(IoDeviceId::new(), || Cell::new(9u32));
        assert_eq!(other.get(), 9, "another device has its own channel");
        // Another core (thread) gets its own channel for the same device.
        let remote = std::thread::spawn(move || get_io_channel(dev, || Cell::new(1u32)).get())
            .join()
            .unwrap();
        assert_eq!(remote, 1);
        drop((a, b));
        let c = get_io_channel(dev, || Cell::new(7u32));
        assert_eq!(c.get(), 7, "dropping the last handle destroyed the channel");
    }
}

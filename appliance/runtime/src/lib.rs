//! # hotcopy-runtime
//!
//! The native stand-in for SPDK's environment and thread library, which cannot
//! be installed here. It keeps SPDK's shape so that a port onto SPDK would be a
//! thin adapter:
//!
//! | SPDK | here |
//! |---|---|
//! | reactor + `spdk_thread` | [`Reactor`]: one per core, a pinned OS thread ([`Runtime`]) |
//! | `spdk_poller` | [`Poller`]: a closure run every pass or every period; unregisters on drop |
//! | `spdk_thread_send_msg` | [`ReactorHandle::send`]: a closure through a bounded lock-free ring |
//! | `spdk_io_device` / `spdk_io_channel` | [`IoDeviceId`] / [`IoChannel`]: per-core state, created on first use |
//! | `spdk_dma_malloc`, mempools | [`BufferPool`] / [`DmaBuf`]: preallocated, aligned, hugepage-backed when possible |
//! | `spdk_get_ticks` | [`clock::ticks`]: the TSC |
//!
//! Rules of the data path: no locks, no allocation, no blocking syscalls in a
//! poller. Everything that talks to the kernel, and every `unsafe`, lives in
//! [`sys`]; the uring queue pair there owns each buffer while the kernel may
//! touch it.
//!
//! Idle policy: reactors busy-poll by default ([`IdlePolicy::Poll`]);
//! [`IdlePolicy::Sleep`] parks a reactor after a run of idle passes, with
//! exponential back-off, and any message wakes it.

pub mod clock;
pub mod io_channel;
pub mod reactor;
pub mod runtime;
pub mod sys;

pub use io_channel::{get_io_channel, IoChannel, IoDeviceId};
pub use reactor::{
    clear_current, IdlePolicy, Message, PollStatus, Poller, PollerBuilder, Reactor, ReactorHandle,
    SendError,
};
pub use runtime::{Runtime, RuntimeConfig, RuntimeError};
pub use sys::dma::{BufferPool, DmaBuf, HugepageMode, LendingRegion, PoolError};

/// The buffer types, also reachable as `hotcopy_runtime::buf`.
pub mod buf {
    pub use crate::sys::dma::*;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runtime_runs_reactors_and_messages_cross_cores() {
        let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP)).unwrap();
        assert_eq!(
            rt.exec_all(|i| Reactor::current().core() == i).unwrap(),
            vec![true, true]
        );
        // Reactor 0 forwards a counter increment to reactor 1 through its handle.
        let counter = Arc::new(AtomicUsize::new(0));
        let to1 = rt.reactor(1).clone();
        for _ in 0..500 {
            let (c, to1) = (counter.clone(), to1.clone());
            rt.exec(0, move || {
                to1.send_blocking(move || {
                    assert_eq!(Reactor::current().core(), 1);
                    c.fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
            })
            .unwrap();
        }
        // A final round trip on reactor 1 runs after everything queued before it.
        rt.exec(1, || ()).unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 500);
        rt.shutdown();
    }
}

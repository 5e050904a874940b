//! Socket sends for the exports (NBD, NVMe/TCP) that a reactor polls.
//!
//! Reads go through `std`'s non-blocking sockets. Sends come here because a
//! reply is several pieces (a header, then data in DMA buffers) that should
//! leave in one syscall, and because a peer that went away must give an
//! error, not a `SIGPIPE`: `std`'s `write_vectored` is `writev`, which
//! cannot pass `MSG_NOSIGNAL`.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

/// The most pieces one [`send_vectored`] call passes to the kernel (Linux's
/// `UIO_MAXIOV`); the rest waits for the next call.
pub const MAX_IOV: usize = 1024;

/// Sends as much of `bufs`, in order, as the socket accepts without
/// blocking (`sendmsg` with `MSG_DONTWAIT | MSG_NOSIGNAL`). Returns the bytes
/// sent; `WouldBlock` when the socket buffer is full; `BrokenPipe` or
/// `ConnectionReset` when the peer is gone.
pub fn send_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let n = bufs.len().min(MAX_IOV);
    // SAFETY: msghdr is a plain C struct for which all-zero bytes is a valid
    // value (no name, no control data, no iovecs).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with `struct iovec` on Unix; the
    // kernel only reads through these pointers.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = n as _;
    // SAFETY: `msg` points at `n` valid iovecs borrowed from `bufs`, which
    // outlive the call; `fd` is an open descriptor borrowed for the call.
    let rc = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn pieces_leave_in_order_and_a_gone_peer_is_an_error() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let n = send_vectored(
            a.as_fd(),
            &[IoSlice::new(b"he"), IoSlice::new(b""), IoSlice::new(b"llo")],
        )
        .unwrap();
        assert_eq!(n, 5);
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // Fill the socket: the call never blocks.
        let big = vec![0u8; 1 << 20];
        let err = loop {
            match send_vectored(a.as_fd(), &[IoSlice::new(&big)]) {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(b);
        let err = send_vectored(a.as_fd(), &[IoSlice::new(b"x")]).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
    }
}

//! Packet buffers shared with the kernel, the per-buffer message slots, and the
//! provided-buffer ring.
//!
//! A received packet stays in its buffer until the send that forwards it completes: the
//! relay never copies a payload. Each buffer id owns one [`Slot`] (msghdr, iovec and
//! address) that describes the operation currently using the buffer, so no per-packet
//! allocation is needed and nothing moves while the kernel holds a pointer to it.

use super::addr::SockaddrBuf;
use io_uring::types::BufRingEntry;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicU16, Ordering};

/// `count` buffers of `size` bytes in one page-aligned allocation.
#[derive(Debug)]
pub struct Buffers {
    base: *mut u8,
    size: usize,
    count: u16,
    layout: Layout,
}

impl Buffers {
    /// Allocates the buffers. `size` is rounded up to 64 bytes.
    pub fn new(count: u16, size: usize) -> Self {
        let size = size.div_ceil(64) * 64;
        let layout = Layout::from_size_align((count as usize * size).max(4096), 4096).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null(), "cannot allocate packet buffers");
        Self { base, size, count, layout }
    }

    /// Size of one buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of buffers.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Pointer to buffer `bid`.
    #[inline]
    pub fn ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        // SAFETY: bid < count keeps the offset inside the allocation.
        unsafe { self.base.add(bid as usize * self.size) }
    }

    /// The first `len` bytes of buffer `bid`.
    ///
    /// # Safety
    /// The kernel must not be writing into this buffer (its receive has completed).
    #[inline]
    pub unsafe fn slice(&self, bid: u16, len: usize) -> &[u8] {
        std::slice::from_raw_parts(self.ptr(bid), len.min(self.size))
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

/// The message header, iovec and address of the operation using one buffer.
#[repr(C)]
pub struct Slot {
    /// The msghdr handed to recvmsg/sendmsg.
    pub hdr: libc::msghdr,
    /// Its single iovec.
    pub iov: libc::iovec,
    /// Its name (source on receive, destination on send).
    pub addr: SockaddrBuf,
}

impl Slot {
    /// Fills the slot for a sendmsg of `len` bytes at `payload` to `dst` and returns the
    /// submission entry for it, sent from socket `fd`.
    ///
    /// # Safety
    /// `payload..payload+len` and the slot itself must stay valid and unmoved until the
    /// operation completes.
    #[inline]
    pub unsafe fn send_entry(
        &mut self,
        fd: std::os::fd::RawFd,
        payload: *mut u8,
        len: usize,
        dst: &std::net::SocketAddr,
        user_data: u64,
    ) -> io_uring::squeue::Entry {
        let namelen = super::addr::write_sockaddr(dst, &mut self.addr);
        self.iov = libc::iovec { iov_base: payload as *mut libc::c_void, iov_len: len };
        self.hdr.msg_name = &mut self.addr as *mut _ as *mut libc::c_void;
        self.hdr.msg_namelen = namelen;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = std::ptr::null_mut();
        self.hdr.msg_controllen = 0;
        self.hdr.msg_flags = 0;
        io_uring::opcode::SendMsg::new(io_uring::types::Fd(fd), &self.hdr).build().user_data(user_data)
    }
}

/// The socket an operation uses: a plain descriptor, or an index into the ring's
/// registered file table (saves a file-table lookup and refcount per operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A plain file descriptor.
    Fd(std::os::fd::RawFd),
    /// A registered (fixed) file index.
    Fixed(u32),
}

impl Slot {
    /// Like [`Slot::send_entry`] but as a `send` with a destination address (Linux 6.0+):
    /// the kernel copies only the address, not a msghdr and iovec.
    ///
    /// # Safety
    /// As for [`Slot::send_entry`].
    #[inline]
    pub unsafe fn send_to_entry(
        &mut self,
        target: Target,
        payload: *mut u8,
        len: usize,
        dst: &std::net::SocketAddr,
        user_data: u64,
    ) -> io_uring::squeue::Entry {
        use io_uring::{opcode::Send, types};
        let namelen = super::addr::write_sockaddr(dst, &mut self.addr);
        let addr = &self.addr as *const _ as *const libc::sockaddr;
        let op = match target {
            Target::Fd(fd) => Send::new(types::Fd(fd), payload, len as u32),
            Target::Fixed(i) => Send::new(types::Fixed(i), payload, len as u32),
        };
        op.dest_addr(addr).dest_addr_len(namelen).build().user_data(user_data)
    }
}

/// One [`Slot`] per buffer, allocated once; slots never move.
pub struct Slots {
    slots: Box<[Slot]>,
}

impl Slots {
    /// `count` zeroed slots.
    pub fn new(count: u16) -> Self {
        // SAFETY: msghdr, iovec and sockaddr_in6 are plain data; all-zero is valid.
        let slots = (0..count).map(|_| unsafe { std::mem::zeroed::<Slot>() }).collect();
        Self { slots }
    }

    /// The slot of buffer `bid`.
    #[inline]
    pub fn get(&mut self, bid: u16) -> &mut Slot {
        &mut self.slots[bid as usize]
    }
}

/// A provided-buffer ring (IORING_REGISTER_PBUF_RING): buffers handed to the kernel,
/// which picks one per received packet.
#[derive(Debug)]
pub struct BufRing {
    base: *mut BufRingEntry,
    mask: u16,
    tail: u16,
    layout: Layout,
}

impl BufRing {
    /// An empty ring of `entries` (a power of two) entries.
    pub fn new(entries: u16) -> Self {
        assert!(entries.is_power_of_two(), "ring entries must be a power of two");
        let bytes = entries as usize * std::mem::size_of::<BufRingEntry>();
        let layout = Layout::from_size_align(bytes.max(4096), 4096).expect("ring layout");
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) } as *mut BufRingEntry;
        assert!(!base.is_null(), "cannot allocate buffer ring");
        Self { base, mask: entries - 1, tail: 0, layout }
    }

    /// Address to register with the kernel.
    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    /// Number of entries.
    pub fn entries(&self) -> u16 {
        self.mask + 1
    }

    /// Queues buffer `bid` at `addr`/`len` for the kernel; visible after [`publish`].
    ///
    /// [`publish`]: BufRing::publish
    #[inline]
    pub fn push(&mut self, bid: u16, addr: *mut u8, len: u32) {
        // SAFETY: the index is masked into the ring.
        let e = unsafe { &mut *self.base.add((self.tail & self.mask) as usize) };
        e.set_addr(addr as u64);
        e.set_len(len);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel (one release store per batch).
    #[inline]
    pub fn publish(&self) {
        // SAFETY: base is the first entry of a page-aligned ring; the tail field lives in
        // its `resv` and is only read by the kernel, which pairs this with an acquire.
        unsafe {
            let tail = BufRingEntry::tail(self.base) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring is unregistered (or the
        // io_uring closed) before the worker drops it.
        unsafe { dealloc(self.base as *mut u8, self.layout) }
    }
}

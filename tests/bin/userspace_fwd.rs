//! A userspace datapath with symbols, for the `--uprobe` tests (tests/dpdk.rs): like testpmd in
//! io mode, it forwards every frame one packet socket receives out of the other, and it has
//! the functions a user probe can hop on, each taking the frame as (pointer, length):
//! `fwd_receive` (just received), `fwd_forward` (chosen its way), `fwd_send` (about to send).
//!
//! `userspace-fwd PORT_A PORT_B`, run inside the namespace of the two devices (the dpdk lab's
//! `--forwarder`); it prints `Press enter to exit` once it forwards and exits on a line or end
//! of file on its standard input, as testpmd without `-i` does.
// The package's dependencies are the library's; this binary needs only libc.
#![allow(unused_crate_dependencies)]

use std::io::{BufRead as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

/// The last frame lengths received and forwarded: each function keeps its own, so that the
/// compiler cannot fold the two into one address (a probe on one would then fire for both).
/// Volatile stores, which the compiler keeps though nothing reads them; not an atomic count:
/// the kernel refuses a uprobe on a lock-prefixed instruction.
static mut RECEIVED: usize = 0;
static mut FORWARDED: usize = 0;

/// The frame was just received from a packet socket.
#[inline(never)]
#[no_mangle]
pub extern "C" fn fwd_receive(buf: *const u8, len: usize) -> usize {
    // SAFETY: only the forwarding thread writes it.
    unsafe { std::ptr::addr_of_mut!(RECEIVED).write_volatile(len) };
    std::hint::black_box((buf, len)).1
}

/// The frame's way out is chosen (the other port): what a switch's lookup would do.
#[inline(never)]
#[no_mangle]
pub extern "C" fn fwd_forward(buf: *const u8, len: usize) -> usize {
    // SAFETY: only the forwarding thread writes it.
    unsafe { std::ptr::addr_of_mut!(FORWARDED).write_volatile(len) };
    std::hint::black_box((buf, len)).1
}

/// The frame is sent out of `fd`.
#[inline(never)]
#[no_mangle]
pub extern "C" fn fwd_send(buf: *const u8, len: usize, fd: RawFd) -> isize {
    // SAFETY: buf points to len initialised bytes of the caller's buffer.
    unsafe { libc::send(fd, buf.cast(), len, 0) }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: userspace-fwd PORT_A PORT_B");
        std::process::exit(2);
    }
    let ports = [open(&args[0]), open(&args[1])];
    std::thread::spawn(|| {
        let _ = std::io::stdin().lock().read_line(&mut String::new());
        std::process::exit(0);
    });
    println!(
        "userspace-fwd: forwarding between {} and {}",
        args[0], args[1]
    );
    println!("Press enter to exit");
    let _ = std::io::stdout().flush();
    forward(&ports);
}

/// A packet socket bound to `ifname`, for every protocol.
fn open(ifname: &str) -> OwnedFd {
    let name = std::ffi::CString::new(ifname).expect("an interface name");
    // SAFETY: plain system calls on values owned here.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            fail(&format!("no interface {ifname}"));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32);
        if fd < 0 {
            fail("cannot open a packet socket");
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        if libc::bind(fd, (&addr as *const libc::sockaddr_ll).cast(), len) < 0 {
            fail(&format!("cannot bind to {ifname}"));
        }
        OwnedFd::from_raw_fd(fd)
    }
}

fn fail(what: &str) -> ! {
    eprintln!("userspace-fwd: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}

/// Waits for frames on both ports and sends each out of the other; the frames the socket
/// itself sent (PACKET_OUTGOING) are not forwarded back.
fn forward(ports: &[OwnedFd; 2]) -> ! {
    let mut buf = vec![0u8; 65_536];
    let mut fds = ports.each_ref().map(|p| libc::pollfd {
        fd: p.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: fds is a live array of two pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        for i in 0..2 {
            if fds[i].revents & libc::POLLIN == 0 {
                continue;
            }
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and from are live and as long as said.
            let n = unsafe {
                libc::recvfrom(
                    fds[i].fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let len = fwd_receive(buf.as_ptr(), n as usize);
            let len = fwd_forward(buf.as_ptr(), len);
            fwd_send(buf.as_ptr(), len, fds[1 - i].fd);
        }
    }
}

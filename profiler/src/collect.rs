//! Drains the kernel's event ring buffer while the traffic runs.

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use profiler_common::Event;
use tokio::{io::unix::AsyncFd, sync::oneshot};

/// Reads events until `stop` fires, then drains what is left and returns everything.
pub async fn collect(
    ring: RingBuf<MapData>,
    mut stop: oneshot::Receiver<()>,
) -> Result<Vec<Event>> {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd holds it.
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
    let mut events = Vec::new();
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut events);
                guard.clear_ready();
            }
            _ = &mut stop => break,
        }
    }
    drain(fd.get_mut(), &mut events);
    Ok(events)
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>) {
    while let Some(item) = ring.next() {
        if let Some(ev) = decode(&item) {
            out.push(ev);
        }
    }
}

pub fn decode(bytes: &[u8]) -> Option<Event> {
    (bytes.len() >= size_of::<Event>())
        // SAFETY: Event is plain data written by the kernel programs with this exact layout.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_event_bytes_and_refuses_short_records() {
        let ev = Event {
            ts_ns: 42,
            seq: 7,
            direction: 1,
            ifindex: 3,
            netns: 9,
            len: 100,
            hook: 2,
            ..Default::default()
        };
        let bytes = unsafe {
            std::slice::from_raw_parts((&ev as *const Event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), Some(ev));
        assert_eq!(decode(&bytes[..10]), None);
    }
}

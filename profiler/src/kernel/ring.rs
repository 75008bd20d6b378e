//! Drains the kernel's event ring buffer while the traffic runs.
//!
//! The programs submit events without waking the reader (a wakeup per event cost more than the
//! rest of a program), so the ring is drained on a timer; at 4 MiB it holds about 100k events,
//! far more than arrive between two drains.

use std::time::Duration;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use profiler_common::Event;
use tokio::sync::oneshot;

pub const DRAIN_EVERY: Duration = Duration::from_millis(5);

/// Reads events until `stop` fires, then drains what is left and returns everything.
pub async fn collect(
    mut ring: RingBuf<MapData>,
    mut stop: oneshot::Receiver<()>,
) -> Result<Vec<Event>> {
    let mut events = Vec::new();
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => drain(&mut ring, &mut events),
            _ = &mut stop => break,
        }
    }
    drain(&mut ring, &mut events);
    Ok(events)
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>) {
    while let Some(item) = ring.next() {
        if let Some(ev) = decode(&item) {
            out.push(ev);
        }
    }
}

/// A record of the kernel's ring buffers (Event, HopEvent), or None for a short one.
pub fn decode<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: T is plain data (Pod) written by the kernel programs with this exact layout.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
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
        assert_eq!(decode::<Event>(&bytes[..10]), None);
    }
}

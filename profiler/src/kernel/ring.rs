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

    use std::mem::offset_of;

    use profiler_common::HopEvent;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// The native-endian integer of N bytes at `at`, as the kernel wrote it.
    fn ne<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
        b[at..at + N].try_into().unwrap()
    }

    proptest! {
        #![proptest_config(crate::proptest_config(2000))]

        /// Any record, at any alignment: decoded field by field from its bytes when it is long
        /// enough, refused when it is short, never a panic.
        #[test]
        fn prop_any_bytes_decode_or_are_refused(bytes in vec(any::<u8>(), 0..160), skip in 0..8usize) {
            let b = &bytes[skip.min(bytes.len())..];
            match decode::<Event>(b) {
                Some(ev) => {
                    prop_assert!(b.len() >= size_of::<Event>());
                    let u32_at = |at| u32::from_ne_bytes(ne(b, at));
                    prop_assert_eq!(ev.ts_ns, u64::from_ne_bytes(ne(b, offset_of!(Event, ts_ns))));
                    prop_assert_eq!(ev.seq, u32_at(offset_of!(Event, seq)));
                    prop_assert_eq!(ev.direction, u32_at(offset_of!(Event, direction)));
                    prop_assert_eq!(ev.ifindex, u32_at(offset_of!(Event, ifindex)));
                    prop_assert_eq!(ev.netns, u32_at(offset_of!(Event, netns)));
                    prop_assert_eq!(ev.len, u32_at(offset_of!(Event, len)));
                    prop_assert_eq!(ev.drop_reason, u32_at(offset_of!(Event, drop_reason)));
                    prop_assert_eq!((ev.hook, ev.flags), (b[offset_of!(Event, hook)], b[offset_of!(Event, flags)]));
                    prop_assert_eq!(ev.cost_ns, u32_at(offset_of!(Event, cost_ns)));
                }
                None => prop_assert!(b.len() < size_of::<Event>()),
            }
            match decode::<HopEvent>(b) {
                Some(hop) => {
                    prop_assert!(b.len() >= size_of::<HopEvent>());
                    let u64_at = |at| u64::from_ne_bytes(ne(b, at));
                    let u32_at = |at| u32::from_ne_bytes(ne(b, at));
                    prop_assert_eq!(hop.ts_ns, u64_at(offset_of!(HopEvent, ts_ns)));
                    prop_assert_eq!(hop.journey_head, u64_at(offset_of!(HopEvent, journey_head)));
                    prop_assert_eq!(hop.journey_start_ns, u64_at(offset_of!(HopEvent, journey_start_ns)));
                    let point = offset_of!(HopEvent, point);
                    prop_assert_eq!(hop.point.ifindex, u32_at(point));
                    prop_assert_eq!(hop.point.netns, u32_at(point + 4));
                    prop_assert_eq!((hop.point.hook, hop.point.flags), (b[point + 8], b[point + 9]));
                    prop_assert_eq!(hop.len, u32_at(offset_of!(HopEvent, len)));
                    prop_assert_eq!(hop.drop_reason, u32_at(offset_of!(HopEvent, drop_reason)));
                    prop_assert_eq!(hop.end, b[offset_of!(HopEvent, end)]);
                }
                None => prop_assert!(b.len() < size_of::<HopEvent>()),
            }
        }
    }
}

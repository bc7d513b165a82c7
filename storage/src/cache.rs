//! A bounded cache of checked, decoded records for reads, keyed by (segment, offset).
//! Keys are never reused (segment ids are never reused), so entries need no
//! invalidation: records of freed segments simply age out. Eviction is first in, first
//! out, which suits a log: new records are the hot ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::format::BatchBody;

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<(u64, u32), BatchBody>,
    order: VecDeque<(u64, u32)>,
    bytes: usize,
}

#[derive(Debug)]
pub(crate) struct RecordCache {
    inner: Mutex<Inner>,
    bytes_max: usize,
}

impl RecordCache {
    pub(crate) fn new(bytes_max: usize) -> RecordCache {
        RecordCache {
            inner: Mutex::new(Inner::default()),
            bytes_max,
        }
    }

    pub(crate) fn get(&self, segment: u64, offset: u32) -> Option<BatchBody> {
        if self.bytes_max == 0 {
            return None;
        }
        self.inner
            .lock()
            .expect("cache lock")
            .map
            .get(&(segment, offset))
            .cloned()
    }

    pub(crate) fn insert(&self, segment: u64, offset: u32, body: BatchBody) {
        let size = body.len();
        if size > self.bytes_max / 4 {
            // One record must not flush the cache.
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        if inner.map.insert((segment, offset), body).is_some() {
            return;
        }
        inner.order.push_back((segment, offset));
        inner.bytes += size;
        while inner.bytes > self.bytes_max {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(b) = inner.map.remove(&old) {
                inner.bytes -= b.len();
            }
        }
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.inner.lock().expect("cache lock").bytes
    }
}

//! The pure scheduling pieces: the priority queue (live, high, medium, low,
//! batch; FIFO within each by submission order) and the device slots a
//! running job holds (N sessions per GPU, N slots in the CPU pool).

use std::collections::BTreeMap;

use super::model::Priority;

/// Queued job ids, by priority class, each class in submission order.
#[derive(Debug, Default)]
pub struct PriorityQueue {
    classes: [BTreeMap<u64, String>; 5],
}

impl PriorityQueue {
    /// Adds a job. A retried job keeps its `seq`, so it goes back ahead of
    /// the jobs submitted after it.
    pub fn push(&mut self, priority: Priority, seq: u64, id: String) {
        self.classes[priority.rank()].insert(seq, id);
    }

    /// The next job to run: the oldest of the most urgent class.
    pub fn pop(&mut self) -> Option<String> {
        self.classes
            .iter_mut()
            .find_map(|c| c.pop_first().map(|(_, id)| id))
    }

    /// Takes a queued job out (cancellation). False when it was not queued.
    pub fn remove(&mut self, priority: Priority, seq: u64) -> bool {
        self.classes[priority.rank()].remove(&seq).is_some()
    }

    pub fn depth(&self, priority: Priority) -> usize {
        self.classes[priority.rank()].len()
    }

    pub fn len(&self) -> usize {
        self.classes.iter().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One pool of run slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `gpu0`, `gpu1`, … or `cpu`.
    pub name: String,
    /// The NVML index, for GPU devices.
    pub gpu: Option<u32>,
    pub capacity: usize,
    pub busy: usize,
}

/// The run slots of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices {
    pub list: Vec<Device>,
}

impl Devices {
    /// `gpus` are the NVML indexes of the usable GPUs (empty without a GPU).
    /// `use_gpus`/`use_cpu` come from the placement setting.
    pub fn new(
        gpus: &[u32],
        sessions_per_gpu: usize,
        cpu_slots: usize,
        use_gpus: bool,
        use_cpu: bool,
    ) -> Devices {
        let mut list = Vec::new();
        if use_gpus {
            for &g in gpus {
                list.push(Device {
                    name: format!("gpu{g}"),
                    gpu: Some(g),
                    capacity: sessions_per_gpu,
                    busy: 0,
                });
            }
        }
        if use_cpu && cpu_slots > 0 {
            list.push(Device {
                name: "cpu".into(),
                gpu: None,
                capacity: cpu_slots,
                busy: 0,
            });
        }
        Devices { list }
    }

    /// Takes a slot: the least busy GPU first, the CPU pool after.
    pub fn acquire(&mut self) -> Option<usize> {
        let pick = self
            .list
            .iter()
            .enumerate()
            .filter(|(_, d)| d.busy < d.capacity)
            .min_by_key(|(i, d)| (d.gpu.is_none(), d.busy, *i))
            .map(|(i, _)| i)?;
        self.list[pick].busy += 1;
        Some(pick)
    }

    pub fn release(&mut self, idx: usize) {
        if let Some(d) = self.list.get_mut(idx) {
            d.busy = d.busy.saturating_sub(1);
        }
    }

    pub fn capacity(&self) -> usize {
        self.list.iter().map(|d| d.capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_goes_first_and_each_class_is_fifo() {
        let mut q = PriorityQueue::default();
        q.push(Priority::Batch, 1, "b1".into());
        q.push(Priority::Medium, 2, "m2".into());
        q.push(Priority::Live, 3, "l3".into());
        q.push(Priority::Medium, 4, "m4".into());
        q.push(Priority::Live, 5, "l5".into());
        assert_eq!(q.len(), 5);
        assert_eq!(q.depth(Priority::Medium), 2);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["l3", "l5", "m2", "m4", "b1"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_retried_job_keeps_its_place_and_cancel_removes() {
        let mut q = PriorityQueue::default();
        q.push(Priority::High, 7, "later".into());
        q.push(Priority::High, 3, "retried".into());
        assert!(q.remove(Priority::High, 7));
        assert!(!q.remove(Priority::High, 7));
        assert_eq!(q.pop().as_deref(), Some("retried"));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn slots_fill_gpus_evenly_then_the_cpu_pool() {
        let mut d = Devices::new(&[0, 1], 2, 1, true, true);
        assert_eq!(d.capacity(), 5);
        let mut names = Vec::new();
        while let Some(i) = d.acquire() {
            names.push(d.list[i].name.clone());
        }
        assert_eq!(names, ["gpu0", "gpu1", "gpu0", "gpu1", "cpu"]);
        assert_eq!(d.acquire(), None);
        d.release(1);
        assert_eq!(d.acquire(), Some(1));
    }

    #[test]
    fn placement_limits_the_pools() {
        let cpu_only = Devices::new(&[0], 2, 3, false, true);
        assert_eq!(cpu_only.list.len(), 1);
        assert_eq!(cpu_only.list[0].name, "cpu");
        let gpu_only = Devices::new(&[0], 2, 3, true, false);
        assert_eq!(gpu_only.capacity(), 2);
        let no_gpu_host = Devices::new(&[], 2, 3, true, true);
        assert_eq!(no_gpu_host.capacity(), 3);
    }
}

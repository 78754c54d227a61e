//! The pure scheduling pieces: the priority queue (live, high, medium, low,
//! batch; FIFO within each by submission order) and the device slots a
//! running job holds (N sessions per GPU, N slots in the CPU pool).

use std::collections::BTreeMap;

use crate::job::Priority;

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

    /// Takes out the first job, most urgent class first and FIFO within
    /// it, for which `can_start` holds. A job that cannot start now (its
    /// device kind is busy) does not hold back the ones behind it.
    pub fn pop_first(&mut self, mut can_start: impl FnMut(&str) -> bool) -> Option<String> {
        for class in self.classes.iter_mut() {
            let found = class
                .iter()
                .find(|(_, id)| can_start(id))
                .map(|(seq, _)| *seq);
            if let Some(seq) = found {
                return class.remove(&seq);
            }
        }
        None
    }

    /// The oldest job of one class: (seq, id).
    pub fn first(&self, priority: Priority) -> Option<(u64, String)> {
        self.classes[priority.rank()]
            .first_key_value()
            .map(|(seq, id)| (*seq, id.clone()))
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

/// What a job may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A GPU session first, else the CPU pool.
    Any,
    /// Only a GPU session (its parameters ask for a GPU encoder, say).
    Gpu,
    /// Only the CPU pool.
    Cpu,
}

impl Need {
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Any => "any",
            Need::Gpu => "gpu",
            Need::Cpu => "cpu",
        }
    }

    /// The stored form back; anything unknown is `Any`.
    pub fn parse(s: &str) -> Need {
        match s {
            "gpu" => Need::Gpu,
            "cpu" => Need::Cpu,
            _ => Need::Any,
        }
    }

    pub fn fits(self, d: &Device) -> bool {
        match self {
            Need::Any => true,
            Need::Gpu => d.gpu.is_some(),
            Need::Cpu => d.gpu.is_none(),
        }
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
        self.acquire_for(Need::Any)
    }

    /// Whether a job with this need could start now.
    pub fn has_free(&self, need: Need) -> bool {
        self.list
            .iter()
            .any(|d| need.fits(d) && d.busy < d.capacity)
    }

    /// Whether this host has any device of the kind at all.
    pub fn has_kind(&self, need: Need) -> bool {
        self.list.iter().any(|d| need.fits(d))
    }

    /// Takes a slot that fits `need`: the least busy GPU first.
    pub fn acquire_for(&mut self, need: Need) -> Option<usize> {
        let pick = self
            .list
            .iter()
            .enumerate()
            .filter(|(_, d)| need.fits(d) && d.busy < d.capacity)
            .min_by_key(|(i, d)| (d.gpu.is_none(), d.busy, *i))
            .map(|(i, _)| i)?;
        self.list[pick].busy += 1;
        Some(pick)
    }

    /// Takes a slot on one device even when it is full (a preempting job,
    /// until the preempted one has stopped).
    pub fn acquire_at(&mut self, idx: usize) {
        if let Some(d) = self.list.get_mut(idx) {
            d.busy += 1;
        }
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
    fn a_gpu_job_waiting_for_a_busy_gpu_does_not_hold_back_cpu_jobs() {
        let mut d = Devices::new(&[0], 1, 1, true, true);
        let mut q = PriorityQueue::default();
        q.push(Priority::Live, 1, "gpu-a".into());
        q.push(Priority::Live, 2, "gpu-b".into());
        q.push(Priority::Live, 3, "cpu-c".into());
        let need = |id: &str| {
            if id.starts_with("gpu") {
                Need::Gpu
            } else {
                Need::Cpu
            }
        };
        let mut started = Vec::new();
        while let Some(id) = q.pop_first(|id| d.has_free(need(id))) {
            let slot = d.acquire_for(need(&id)).unwrap();
            started.push((id, d.list[slot].name.clone()));
        }
        assert_eq!(
            started,
            [
                ("gpu-a".to_string(), "gpu0".to_string()),
                ("cpu-c".to_string(), "cpu".to_string())
            ]
        );
        assert_eq!(q.len(), 1, "gpu-b waits for the GPU");
        assert!(d.has_kind(Need::Gpu) && d.has_kind(Need::Cpu));
        assert!(!Devices::new(&[], 2, 2, true, true).has_kind(Need::Gpu));
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

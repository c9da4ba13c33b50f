//! Iterations per second of the pure engine model in steady state: `batch` sequences decoding,
//! each finished one replaced at once by a new request (so admissions and prefill chunks are part
//! of the measured mix, as in a loaded engine). Target: ≥ 100,000 iterations/s at batch 64.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qoe_sim::{Engine, EngineConfig, EngineEvent, Profile, SimRequest};
use std::hint::black_box;

struct Loaded {
    engine: Engine,
    now: u64,
    next_id: u64,
    events: Vec<EngineEvent>,
}

impl Loaded {
    fn new(batch: u32) -> Self {
        let mut cfg = EngineConfig::for_profile(Profile::h100_llama3_8b());
        cfg.max_num_seqs = batch;
        cfg.jitter = 0.05;
        let mut l = Self {
            engine: Engine::new(cfg).unwrap(),
            now: 0,
            next_id: 0,
            events: Vec::with_capacity(4 * batch as usize),
        };
        for _ in 0..batch {
            l.submit();
        }
        // Warm up past the initial prefill burst.
        for _ in 0..2000 {
            l.step();
        }
        l
    }

    fn submit(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        // Staggered lengths so finishes (and admissions) spread over iterations.
        let out = 128 + (id % 256) as u32;
        let mut r = SimRequest::new(id, 512, out);
        r.prefix_hashes = (0..32).map(|b| (id % 8) * 1000 + b).collect();
        self.engine.submit(r, self.now).unwrap();
    }

    #[inline]
    fn step(&mut self) -> u64 {
        self.events.clear();
        let dur = self.engine.step(self.now, &mut self.events);
        self.now += dur;
        let finished = self
            .events
            .iter()
            .filter(|e| matches!(e, EngineEvent::Finished { .. }))
            .count();
        for _ in 0..finished {
            self.submit();
        }
        dur
    }
}

fn bench_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_step");
    for batch in [64u32, 256] {
        let mut l = Loaded::new(batch);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("steady_state_batch", batch),
            &batch,
            |b, _| b.iter(|| black_box(l.step())),
        );
        let s = l.engine.stats();
        assert_eq!(s.running + s.waiting, batch, "the batch stayed full");
    }
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);

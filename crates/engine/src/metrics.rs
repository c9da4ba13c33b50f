//! `/metrics` in vLLM's Prometheus text format: V1 names, labels and bucket bounds as vLLM 0.32
//! prints them (see `vllm-0.32-metrics-under-load.txt`), so the router parses this engine with the
//! very code path it uses for a real one. Optionally the V0 names older vLLM releases used.

use qoe_sim::{EngineStats, Histogram};
use std::fmt::Write as _;

/// Prometheus text exposition content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A number as Python's `prometheus_client` prints it: `64.0`, `0.25`.
fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Writer {
    out: String,
    labels: String,
}

impl Writer {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.header(name, kind, help);
        let _ = writeln!(self.out, "{name}{{{}}} {}", self.labels, num(value));
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram, model: &str) {
        self.header(name, "histogram", help);
        // vLLM's label order: engine, le, model_name.
        for (bound, count) in h
            .bounds()
            .iter()
            .map(|b| num(*b))
            .chain(std::iter::once("+Inf".to_string()))
            .zip(h.cumulative())
        {
            let _ = writeln!(
                self.out,
                "{name}_bucket{{engine=\"0\",le=\"{bound}\",model_name=\"{model}\"}} {}",
                num(count as f64)
            );
        }
        let _ = writeln!(
            self.out,
            "{name}_count{{{}}} {}",
            self.labels,
            num(h.count() as f64)
        );
        let _ = writeln!(
            self.out,
            "{name}_sum{{{}}} {}",
            self.labels,
            num(h.sum_seconds())
        );
    }
}

/// Renders the engine's metrics for `model_name`.
pub fn render(s: &EngineStats, model_name: &str, v0: bool) -> String {
    let model = escape(model_name);
    let mut w = Writer {
        out: String::with_capacity(8 * 1024),
        labels: format!("engine=\"0\",model_name=\"{model}\""),
    };
    w.sample(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
        s.running as f64,
    );
    w.sample(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        s.waiting as f64,
    );
    w.sample(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        s.kv_usage(),
    );
    w.sample(
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        s.prefix_cache_queries as f64,
    );
    w.sample(
        "vllm:prefix_cache_hits_total",
        "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
        s.prefix_cache_hits as f64,
    );
    w.sample(
        "vllm:num_preemptions_total",
        "counter",
        "Cumulative number of preemption from the engine.",
        s.preemptions as f64,
    );
    w.sample(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        s.prompt_tokens as f64,
    );
    w.sample(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        s.generation_tokens as f64,
    );
    w.header(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, n) in [
        ("stop", s.finished_stop),
        ("length", s.finished_length),
        ("abort", s.finished_abort),
        // vLLM 0.32 prints these too; the model never ends a request with them.
        ("error", 0),
        ("repetition", 0),
    ] {
        let _ = writeln!(
            w.out,
            "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{model}\"}} {}",
            num(n as f64)
        );
    }
    w.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &s.ttft,
        &model,
    );
    w.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &s.itl,
        &model,
    );
    w.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &s.e2e,
        &model,
    );
    w.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &s.queue_time,
        &model,
    );
    if v0 {
        // V0 labelled by model only.
        w.labels = format!("model_name=\"{model}\"");
        w.sample(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            s.kv_usage(),
        );
        w.sample(
            "vllm:gpu_prefix_cache_hit_rate",
            "gauge",
            "GPU prefix cache block hit rate.",
            s.prefix_hit_rate(),
        );
        w.sample(
            "vllm:gpu_prefix_cache_queries_total",
            "counter",
            "GPU prefix cache queries, in terms of number of queried tokens.",
            s.prefix_cache_queries as f64,
        );
        w.sample(
            "vllm:gpu_prefix_cache_hits_total",
            "counter",
            "GPU prefix cache hits, in terms of number of cached tokens.",
            s.prefix_cache_hits as f64,
        );
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoe_sim::{Engine, EngineConfig, Profile, SimRequest};

    fn stats() -> EngineStats {
        let mut e = Engine::new(EngineConfig::for_profile(Profile::tiny())).unwrap();
        for id in 0..5 {
            e.submit(SimRequest::new(id, 100, 10), 0).unwrap();
        }
        let (mut now, mut ev) = (0, Vec::new());
        while e.has_work() {
            now += e.step(now, &mut ev);
        }
        e.stats().clone()
    }

    #[test]
    fn numbers_print_like_python() {
        assert_eq!(num(64.0), "64.0");
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(0.001), "0.001");
        assert_eq!(num(2560.0), "2560.0");
    }

    #[test]
    fn histogram_lines_follow_vllm() {
        let text = render(&stats(), "m", false);
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.001\",model_name=\"m\"}"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m\"} 5.0"
        ));
        assert!(text.contains(
            "vllm:inter_token_latency_seconds_count{engine=\"0\",model_name=\"m\"} 45.0"
        ));
        assert!(text.contains("vllm:generation_tokens_total{engine=\"0\",model_name=\"m\"} 50.0"));
        assert!(text.contains("# TYPE vllm:prefix_cache_hits_total counter"));
        assert!(!text.contains("gpu_cache_usage_perc"));
        let v0 = render(&stats(), "m", true);
        assert!(v0.contains("vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.0"));
        assert!(v0.contains("vllm:gpu_prefix_cache_hit_rate{model_name=\"m\"}"));
    }

    #[test]
    fn success_counter_has_every_finish_reason_of_vllm() {
        let text = render(&stats(), "m", false);
        for reason in ["stop", "length", "abort", "error", "repetition"] {
            let line = format!(
                "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"m\"}} "
            );
            assert!(text.contains(&line), "{reason}");
        }
    }

    #[test]
    fn core_parser_reads_it_like_the_real_sample() {
        let text = render(&stats(), "sim-llama", true);
        let m = qoe_core::engine_metrics::parse_engine_metrics(&text, Some("sim-llama"));
        assert_eq!(m.running, Some(0.0));
        assert_eq!(m.waiting, Some(0.0));
    }
}

#[cfg(test)]
mod parity {
    use super::*;
    use qoe_core::engine_metrics::parse_engine_metrics_detailed;
    use qoe_core::EngineMetrics;

    /// Which fields a parse found (values differ; presence must not).
    fn presence(m: &EngineMetrics) -> [bool; 13] {
        [
            m.running.is_some(),
            m.waiting.is_some(),
            m.kv_usage.is_some(),
            m.prefix_queries.is_some(),
            m.prefix_hits.is_some(),
            m.prefix_hit_rate.is_some(),
            m.preemptions.is_some(),
            m.prompt_tokens.is_some(),
            m.generation_tokens.is_some(),
            m.ttft_sum.is_some(),
            m.ttft_count.is_some(),
            m.itl_sum.is_some(),
            m.itl_count.is_some(),
        ]
    }

    /// The router's parser finds in this engine's `/metrics` exactly what it finds in a real vLLM
    /// 0.32's (the sample in the shared reference folder, when present).
    #[test]
    fn same_fields_as_the_real_vllm_sample() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/reference/vllm-0.32-metrics-under-load.txt"
        );
        let Ok(real) = std::fs::read_to_string(path) else {
            eprintln!("skipped: {path} not found");
            return;
        };
        let real = parse_engine_metrics_detailed(&real, Some("tiny-llama"));
        let mut e =
            qoe_sim::Engine::new(qoe_sim::EngineConfig::for_profile(qoe_sim::Profile::tiny()))
                .unwrap();
        e.submit(qoe_sim::SimRequest::new(1, 64, 4), 0).unwrap();
        let (mut now, mut ev) = (0, Vec::new());
        while e.has_work() {
            now += e.step(now, &mut ev);
        }
        let ours = parse_engine_metrics_detailed(
            &render(e.stats(), "tiny-llama", false),
            Some("tiny-llama"),
        );
        assert_eq!(ours.flavour, real.flavour);
        assert_eq!(presence(&ours.metrics), presence(&real.metrics));
        assert_eq!(ours.malformed, 0);
    }
}

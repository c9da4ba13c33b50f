//! Reading an engine's Prometheus `/metrics` into [`EngineMetrics`].
//!
//! Engines name the same signals differently, and names move between releases, so this module is
//! the one place that knows them (FIELD-NOTES, "vLLM facts a router relies on"):
//!
//! | signal | vLLM V1 (0.32) | legacy vLLM (V0, early V1) | SGLang |
//! |---|---|---|---|
//! | running | `vllm:num_requests_running` | same | `sglang:num_running_reqs` |
//! | waiting | `vllm:num_requests_waiting` | same | `sglang:num_queue_reqs` |
//! | KV usage 0..1 | `vllm:kv_cache_usage_perc` | `vllm:gpu_cache_usage_perc` | `sglang:token_usage` |
//! | prefix queries / hits (tokens) | `vllm:prefix_cache_{queries,hits}_total` | `vllm:gpu_prefix_cache_{queries,hits}_total` | — |
//! | prefix hit rate | — | `vllm:gpu_prefix_cache_hit_rate` | `sglang:cache_hit_rate` |
//! | preemptions | `vllm:num_preemptions_total` | same | `sglang:num_retracted_requests_total` |
//! | prompt / output tokens | `vllm:{prompt,generation}_tokens_total` | same | `sglang:{prompt,generation}_tokens_total` |
//! | TTFT histogram | `vllm:time_to_first_token_seconds` | same | `sglang:time_to_first_token_seconds` |
//! | ITL histogram | `vllm:inter_token_latency_seconds` | `vllm:time_per_output_token_seconds` | `sglang:inter_token_latency_seconds`, else `sglang:time_per_output_token_seconds` |
//!
//! When an engine exports both a current and a legacy name (vLLM kept deprecated aliases for a
//! few releases), the current one wins; the legacy one is only a fallback.
//!
//! **Several label sets** (vLLM's `engine` label under data parallelism, SGLang's `tp_rank` /
//! `dp_rank`): counts, counters and histogram sums/counts are **summed**; fractions (KV usage,
//! hit rate) are **averaged**. The mean is the endpoint's overall fullness when its ranks have
//! equal pools (the usual case), which is what a router comparing endpoints needs; the max is also
//! reported ([`ParsedEngineMetrics::kv_usage_max`]) for a policy that fears the fullest rank.
//!
//! **Model filter**: with `model: Some(m)`, only samples whose `model_name` label equals `m`, or
//! that have no `model_name` label, are counted (an endpoint serving several models, or LoRA
//! adapters registered under their own names).
//!
//! Non-finite values (`NaN`, `±Inf`) are ignored rather than allowed to poison a sum. The parse is
//! one pass of [`crate::prom`] that skips every line whose name is not one of the above without
//! reading its labels or value.

use crate::prom::Parser;
use crate::EngineMetrics;

/// Which engine (and metric generation) a scrape came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum EngineFlavour {
    /// vLLM with the current V1 names (`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_*`,
    /// `vllm:inter_token_latency_seconds`).
    VllmV1,
    /// vLLM with only the legacy names (the V0 engine, and early V1 releases that kept them).
    VllmV0,
    /// SGLang (`sglang:` names).
    SgLang,
    /// None of the known metric names were found.
    #[default]
    Unknown,
}

/// [`EngineMetrics`] plus what the parse learned about the scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ParsedEngineMetrics {
    pub metrics: EngineMetrics,
    pub flavour: EngineFlavour,
    /// The fullest rank's KV usage, when several label sets report one (`metrics.kv_usage` is
    /// their mean).
    pub kv_usage_max: Option<f64>,
    /// Samples that fed a field (after the model filter).
    pub matched: usize,
    /// Lines of the scrape that did not parse (among those that were read; see
    /// [`Parser::next_sample_where`]).
    pub malformed: usize,
}

/// Reads the signals a router uses from an engine's `/metrics` text; see the module docs for
/// names, aggregation and the model filter.
pub fn parse_engine_metrics(text: &str, model: Option<&str>) -> EngineMetrics {
    parse_engine_metrics_detailed(text, model).metrics
}

/// As [`parse_engine_metrics`], also reporting the engine flavour detected and parse counts.
pub fn parse_engine_metrics_detailed(text: &str, model: Option<&str>) -> ParsedEngineMetrics {
    let mut acc = [[Acc::default(); 2]; FIELDS];
    let mut seen = Seen::default();
    let mut matched = 0;
    let mut parser = Parser::new(text);
    loop {
        let mut hit = None;
        let Some(sample) = parser.next_sample_where(|name| {
            hit = lookup(name);
            hit.is_some()
        }) else {
            break;
        };
        let Some(t) = hit else { continue };
        seen.note(t.gen);
        if !sample.value.is_finite() {
            continue;
        }
        if let Some(m) = model {
            if let Some(v) = sample.label("model_name") {
                if v != m {
                    continue;
                }
            }
        }
        acc[t.field as usize][t.rank as usize].add(sample.value);
        matched += 1;
    }

    let pick = |f: Field| -> Option<Acc> {
        let [primary, fallback] = acc[f as usize];
        if primary.n > 0 {
            Some(primary)
        } else if fallback.n > 0 {
            Some(fallback)
        } else {
            None
        }
    };
    let sum = |f: Field| pick(f).map(|a| a.sum);
    let mean = |f: Field| pick(f).map(|a| a.sum / a.n as f64);

    let metrics = EngineMetrics {
        running: sum(Field::Running),
        waiting: sum(Field::Waiting),
        kv_usage: mean(Field::KvUsage),
        prefix_queries: sum(Field::PrefixQueries),
        prefix_hits: sum(Field::PrefixHits),
        prefix_hit_rate: mean(Field::PrefixHitRate),
        preemptions: sum(Field::Preemptions),
        prompt_tokens: sum(Field::PromptTokens),
        generation_tokens: sum(Field::GenerationTokens),
        ttft_sum: sum(Field::TtftSum),
        ttft_count: sum(Field::TtftCount),
        itl_sum: sum(Field::ItlSum),
        itl_count: sum(Field::ItlCount),
        // Derived across scrapes by `EngineMetrics::follow`.
        peak_running: None,
        full_seats: None,
    };
    ParsedEngineMetrics {
        metrics,
        flavour: seen.flavour(),
        kv_usage_max: pick(Field::KvUsage).map(|a| a.max),
        matched,
        malformed: parser.malformed(),
    }
}

#[derive(Clone, Copy, Debug)]
struct Acc {
    sum: f64,
    max: f64,
    n: u32,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            sum: 0.0,
            max: f64::NEG_INFINITY,
            n: 0,
        }
    }
}

impl Acc {
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.max = self.max.max(v);
        self.n += 1;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Running,
    Waiting,
    KvUsage,
    PrefixQueries,
    PrefixHits,
    PrefixHitRate,
    Preemptions,
    PromptTokens,
    GenerationTokens,
    TtftSum,
    TtftCount,
    ItlSum,
    ItlCount,
}

const FIELDS: usize = Field::ItlCount as usize + 1;

/// Which generation of names a metric belongs to, for flavour detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gen {
    /// A `vllm:` name common to all versions.
    Vllm,
    /// A name only current vLLM V1 exports.
    VllmV1,
    /// A legacy vLLM name.
    VllmLegacy,
    SgLang,
}

#[derive(Clone, Copy, Debug)]
struct Target {
    field: Field,
    /// 0: the preferred name for the field; 1: a fallback used only when no preferred sample is
    /// present.
    rank: u8,
    gen: Gen,
}

#[derive(Default)]
struct Seen {
    vllm: bool,
    v1: bool,
    sglang: bool,
}

impl Seen {
    fn note(&mut self, gen: Gen) {
        match gen {
            Gen::Vllm | Gen::VllmLegacy => self.vllm = true,
            Gen::VllmV1 => self.v1 = true,
            Gen::SgLang => self.sglang = true,
        }
    }

    fn flavour(&self) -> EngineFlavour {
        if self.sglang {
            EngineFlavour::SgLang
        } else if self.v1 {
            EngineFlavour::VllmV1
        } else if self.vllm {
            EngineFlavour::VllmV0
        } else {
            EngineFlavour::Unknown
        }
    }
}

/// The field a metric name feeds, if any.
#[inline]
fn lookup(name: &str) -> Option<Target> {
    use Field::*;
    let t = |field, rank, gen| Some(Target { field, rank, gen });
    if let Some(rest) = name.strip_prefix("vllm:") {
        // Cheap rejection of the bulk of a scrape: histogram buckets and `_created` series.
        if rest.ends_with("_bucket") || rest.ends_with("_created") {
            return None;
        }
        match rest {
            "num_requests_running" => t(Running, 0, Gen::Vllm),
            "num_requests_waiting" => t(Waiting, 0, Gen::Vllm),
            "kv_cache_usage_perc" => t(KvUsage, 0, Gen::VllmV1),
            "gpu_cache_usage_perc" => t(KvUsage, 1, Gen::VllmLegacy),
            "prefix_cache_queries_total" => t(PrefixQueries, 0, Gen::VllmV1),
            "gpu_prefix_cache_queries_total" => t(PrefixQueries, 1, Gen::VllmLegacy),
            "prefix_cache_hits_total" => t(PrefixHits, 0, Gen::VllmV1),
            "gpu_prefix_cache_hits_total" => t(PrefixHits, 1, Gen::VllmLegacy),
            "gpu_prefix_cache_hit_rate" => t(PrefixHitRate, 0, Gen::VllmLegacy),
            "num_preemptions_total" => t(Preemptions, 0, Gen::Vllm),
            "prompt_tokens_total" => t(PromptTokens, 0, Gen::Vllm),
            "generation_tokens_total" => t(GenerationTokens, 0, Gen::Vllm),
            "time_to_first_token_seconds_sum" => t(TtftSum, 0, Gen::Vllm),
            "time_to_first_token_seconds_count" => t(TtftCount, 0, Gen::Vllm),
            "inter_token_latency_seconds_sum" => t(ItlSum, 0, Gen::VllmV1),
            "inter_token_latency_seconds_count" => t(ItlCount, 0, Gen::VllmV1),
            "time_per_output_token_seconds_sum" => t(ItlSum, 1, Gen::VllmLegacy),
            "time_per_output_token_seconds_count" => t(ItlCount, 1, Gen::VllmLegacy),
            _ => None,
        }
    } else if let Some(rest) = name.strip_prefix("sglang:") {
        if rest.ends_with("_bucket") {
            return None;
        }
        match rest {
            "num_running_reqs" => t(Running, 0, Gen::SgLang),
            "num_queue_reqs" => t(Waiting, 0, Gen::SgLang),
            "token_usage" => t(KvUsage, 0, Gen::SgLang),
            "cache_hit_rate" => t(PrefixHitRate, 0, Gen::SgLang),
            "num_retracted_requests_total" => t(Preemptions, 0, Gen::SgLang),
            "prompt_tokens_total" => t(PromptTokens, 0, Gen::SgLang),
            "generation_tokens_total" => t(GenerationTokens, 0, Gen::SgLang),
            "time_to_first_token_seconds_sum" => t(TtftSum, 0, Gen::SgLang),
            "time_to_first_token_seconds_count" => t(TtftCount, 0, Gen::SgLang),
            "inter_token_latency_seconds_sum" => t(ItlSum, 0, Gen::SgLang),
            "inter_token_latency_seconds_count" => t(ItlCount, 0, Gen::SgLang),
            "time_per_output_token_seconds_sum" => t(ItlSum, 1, Gen::SgLang),
            "time_per_output_token_seconds_count" => t(ItlCount, 1, Gen::SgLang),
            _ => None,
        }
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNDER_LOAD: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/vllm-0.32-metrics-under-load.txt"
    ));
    const IDLE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/vllm-0.32-metrics-idle.txt"
    ));

    #[test]
    fn vllm_v1_under_load_exact() {
        for model in [None, Some("tiny-llama")] {
            let p = parse_engine_metrics_detailed(UNDER_LOAD, model);
            assert_eq!(p.flavour, EngineFlavour::VllmV1);
            assert_eq!(p.malformed, 0);
            assert_eq!(p.matched, 12, "every field but the V0/SGLang hit rate");
            let m = p.metrics;
            assert_eq!(m.running, Some(64.0));
            assert_eq!(m.waiting, Some(0.0));
            assert_eq!(m.kv_usage, Some(0.011780504181163387));
            assert_eq!(p.kv_usage_max, Some(0.011780504181163387));
            assert_eq!(m.prefix_queries, Some(249156.0));
            assert_eq!(m.prefix_hits, Some(123776.0));
            assert_eq!(m.prefix_hit_rate, None, "V1 reports counters, not a rate");
            assert_eq!(m.preemptions, Some(0.0));
            assert_eq!(m.prompt_tokens, Some(248880.0));
            assert_eq!(m.generation_tokens, Some(65802.0));
            assert_eq!(m.ttft_sum, Some(77.76805901527405));
            assert_eq!(m.ttft_count, Some(1058.0));
            assert_eq!(m.itl_sum, Some(631.7296819859916));
            assert_eq!(m.itl_count, Some(64744.0));
        }
    }

    #[test]
    fn vllm_v1_idle_exact() {
        let p = parse_engine_metrics_detailed(IDLE, None);
        assert_eq!(p.flavour, EngineFlavour::VllmV1);
        let m = p.metrics;
        assert_eq!(m.running, Some(0.0));
        assert_eq!(m.waiting, Some(0.0));
        assert_eq!(m.kv_usage, Some(0.0));
        assert_eq!(m.prefix_queries, Some(267400.0));
        assert_eq!(m.prefix_hits, Some(140160.0));
        assert_eq!(m.preemptions, Some(0.0));
        assert_eq!(m.prompt_tokens, Some(267124.0));
        assert_eq!(m.generation_tokens, Some(76738.0));
        assert_eq!(m.ttft_sum, Some(81.47981119155884));
        assert_eq!(m.ttft_count, Some(1122.0));
        assert_eq!(m.itl_sum, Some(715.257294491995));
        assert_eq!(m.itl_count, Some(75616.0));
        assert_eq!(parse_engine_metrics(IDLE, None), m);
    }

    #[test]
    fn model_filter_excludes_other_models() {
        let p = parse_engine_metrics_detailed(UNDER_LOAD, Some("other-model"));
        assert_eq!(p.metrics, EngineMetrics::default());
        assert_eq!(p.matched, 0);
        assert_eq!(
            p.flavour,
            EngineFlavour::VllmV1,
            "flavour comes from names, not the filter"
        );
    }

    #[test]
    fn data_parallel_engines_sum_counts_and_average_usage() {
        let text = "\
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 10.0
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 6.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 1
vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 2
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.2
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.6
vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 100
vllm:prefix_cache_queries_total{engine=\"1\",model_name=\"m\"} 50
vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"m\"} 3
vllm:time_to_first_token_seconds_count{engine=\"1\",model_name=\"m\"} 4
vllm:num_requests_running{engine=\"0\",model_name=\"lora-a\"} 100
vllm:num_requests_running{engine=\"0\"} 1
";
        let p = parse_engine_metrics_detailed(text, Some("m"));
        let m = p.metrics;
        assert_eq!(
            m.running,
            Some(17.0),
            "engines summed, other model excluded, unlabelled kept"
        );
        assert_eq!(m.waiting, Some(3.0));
        assert!((m.kv_usage.unwrap() - 0.4).abs() < 1e-12, "usage averaged");
        assert_eq!(p.kv_usage_max, Some(0.6));
        assert_eq!(m.prefix_queries, Some(150.0));
        assert_eq!(m.ttft_count, Some(7.0));
        assert_eq!(parse_engine_metrics(text, None).running, Some(117.0));
    }

    #[test]
    fn vllm_v0_names() {
        let text = "\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name=\"meta-llama/Llama-2-7b-hf\"} 12.0
vllm:num_requests_swapped{model_name=\"meta-llama/Llama-2-7b-hf\"} 0.0
vllm:num_requests_waiting{model_name=\"meta-llama/Llama-2-7b-hf\"} 5.0
vllm:gpu_cache_usage_perc{model_name=\"meta-llama/Llama-2-7b-hf\"} 0.875
vllm:cpu_cache_usage_perc{model_name=\"meta-llama/Llama-2-7b-hf\"} 0.0
vllm:gpu_prefix_cache_hit_rate{model_name=\"meta-llama/Llama-2-7b-hf\"} 0.25
vllm:num_preemptions_total{model_name=\"meta-llama/Llama-2-7b-hf\"} 3.0
vllm:prompt_tokens_total{model_name=\"meta-llama/Llama-2-7b-hf\"} 1.2e+04
vllm:generation_tokens_total{model_name=\"meta-llama/Llama-2-7b-hf\"} 3400.0
vllm:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"meta-llama/Llama-2-7b-hf\"} 40.0
vllm:time_to_first_token_seconds_count{model_name=\"meta-llama/Llama-2-7b-hf\"} 40.0
vllm:time_to_first_token_seconds_sum{model_name=\"meta-llama/Llama-2-7b-hf\"} 8.0
vllm:time_per_output_token_seconds_count{model_name=\"meta-llama/Llama-2-7b-hf\"} 3360.0
vllm:time_per_output_token_seconds_sum{model_name=\"meta-llama/Llama-2-7b-hf\"} 67.2
";
        let p = parse_engine_metrics_detailed(text, Some("meta-llama/Llama-2-7b-hf"));
        assert_eq!(p.flavour, EngineFlavour::VllmV0);
        let m = p.metrics;
        assert_eq!(m.running, Some(12.0));
        assert_eq!(m.waiting, Some(5.0));
        assert_eq!(m.kv_usage, Some(0.875));
        assert_eq!(m.prefix_hit_rate, Some(0.25));
        assert_eq!(m.prefix_queries, None);
        assert_eq!(m.preemptions, Some(3.0));
        assert_eq!(m.prompt_tokens, Some(12000.0));
        assert_eq!(m.generation_tokens, Some(3400.0));
        assert_eq!(m.ttft_count, Some(40.0));
        assert_eq!(m.ttft_sum, Some(8.0));
        assert_eq!(m.itl_count, Some(3360.0));
        assert_eq!(m.itl_sum, Some(67.2));
    }

    #[test]
    fn current_names_win_over_legacy_aliases() {
        // A transitional vLLM exporting both generations (with different values, to tell them
        // apart); order must not matter.
        let legacy = "\
vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.9
vllm:gpu_prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 1
vllm:gpu_prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 1
vllm:time_per_output_token_seconds_sum{engine=\"0\",model_name=\"m\"} 1
vllm:time_per_output_token_seconds_count{engine=\"0\",model_name=\"m\"} 1
";
        let current = "\
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5
vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 20
vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 10
vllm:inter_token_latency_seconds_sum{engine=\"0\",model_name=\"m\"} 2
vllm:inter_token_latency_seconds_count{engine=\"0\",model_name=\"m\"} 200
";
        for text in [format!("{legacy}{current}"), format!("{current}{legacy}")] {
            let p = parse_engine_metrics_detailed(&text, None);
            assert_eq!(p.flavour, EngineFlavour::VllmV1);
            let m = p.metrics;
            assert_eq!(m.kv_usage, Some(0.5));
            assert_eq!(m.prefix_queries, Some(20.0));
            assert_eq!(m.prefix_hits, Some(10.0));
            assert_eq!(m.itl_sum, Some(2.0));
            assert_eq!(m.itl_count, Some(200.0));
        }
        let p = parse_engine_metrics_detailed(legacy, None);
        assert_eq!(p.flavour, EngineFlavour::VllmV0);
        assert_eq!(p.metrics.kv_usage, Some(0.9));
        assert_eq!(p.metrics.itl_count, Some(1.0));
    }

    #[test]
    fn sglang_with_dp_ranks() {
        let text = "\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank=\"0\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 30.0
sglang:num_running_reqs{dp_rank=\"1\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 34.0
sglang:num_queue_reqs{dp_rank=\"0\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 2.0
sglang:num_queue_reqs{dp_rank=\"1\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 0.0
sglang:token_usage{dp_rank=\"0\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 0.25
sglang:token_usage{dp_rank=\"1\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 0.75
sglang:cache_hit_rate{dp_rank=\"0\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 0.5
sglang:cache_hit_rate{dp_rank=\"1\",engine_type=\"unified\",model_name=\"qwen\",pp_rank=\"0\",tp_rank=\"0\"} 0.3
sglang:num_retracted_requests_total{dp_rank=\"0\",model_name=\"qwen\"} 4.0
sglang:prompt_tokens_total{model_name=\"qwen\"} 8.128902e+06
sglang:generation_tokens_total{model_name=\"qwen\"} 7.557572e+06
sglang:time_to_first_token_seconds_sum{model_name=\"qwen\"} 2.3518979474117756e+06
sglang:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"qwen\"} 273592.0
sglang:time_to_first_token_seconds_count{model_name=\"qwen\"} 273592.0
sglang:time_per_output_token_seconds_sum{model_name=\"qwen\"} 9.0
sglang:time_per_output_token_seconds_count{model_name=\"qwen\"} 90.0
sglang:inter_token_latency_seconds_sum{model_name=\"qwen\"} 7.0
sglang:inter_token_latency_seconds_count{model_name=\"qwen\"} 700.0
";
        let p = parse_engine_metrics_detailed(text, Some("qwen"));
        assert_eq!(p.flavour, EngineFlavour::SgLang);
        let m = p.metrics;
        assert_eq!(m.running, Some(64.0));
        assert_eq!(m.waiting, Some(2.0));
        assert_eq!(m.kv_usage, Some(0.5));
        assert_eq!(p.kv_usage_max, Some(0.75));
        assert!((m.prefix_hit_rate.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(m.prefix_queries, None);
        assert_eq!(m.preemptions, Some(4.0));
        assert_eq!(m.prompt_tokens, Some(8128902.0));
        assert_eq!(m.generation_tokens, Some(7557572.0));
        assert_eq!(m.ttft_sum, Some(2351897.9474117756));
        assert_eq!(m.ttft_count, Some(273592.0));
        assert_eq!(m.itl_sum, Some(7.0), "ITL preferred over per-request TPOT");
        assert_eq!(m.itl_count, Some(700.0));

        // Older SGLang without the ITL histogram: TPOT is the fallback.
        let old: String = text
            .lines()
            .filter(|l| !l.contains("inter_token"))
            .map(|l| format!("{l}\n"))
            .collect();
        let m = parse_engine_metrics(&old, None);
        assert_eq!(m.itl_sum, Some(9.0));
        assert_eq!(m.itl_count, Some(90.0));
    }

    #[test]
    fn garbage_and_non_finite_values() {
        let text = "\
vllm:num_requests_running{engine=\"0\"} NaN
vllm:num_requests_running{engine=\"1\"} 3
vllm:num_requests_waiting{engine=\"0\" 4
vllm:kv_cache_usage_perc{engine=\"0\"} +Inf
not a metric line at all
";
        let p = parse_engine_metrics_detailed(text, None);
        assert_eq!(p.metrics.running, Some(3.0));
        assert_eq!(p.metrics.waiting, None);
        assert_eq!(p.metrics.kv_usage, None);
        assert_eq!(
            p.malformed, 1,
            "only lines with a wanted name are validated"
        );
        assert_eq!(p.flavour, EngineFlavour::VllmV1);
        let empty = parse_engine_metrics_detailed("", None);
        assert_eq!(empty.flavour, EngineFlavour::Unknown);
        assert_eq!(empty.metrics, EngineMetrics::default());
    }

    proptest! {
        #[test]
        fn never_panics(text in any::<String>(), model in prop::option::of("[a-z]{0,4}")) {
            let _ = parse_engine_metrics_detailed(&text, model.as_deref());
        }

        #[test]
        fn sums_do_not_depend_on_line_order_or_split(
            values in prop::collection::vec((0u32..1000, 0u32..1000, 0u32..=100), 1..8),
            seed in any::<u64>(),
        ) {
            // Integer-valued samples (exact in f64), one label set per engine.
            let mut lines: Vec<String> = vec![];
            for (i, (run, wait, kv)) in values.iter().enumerate() {
                lines.push(format!("vllm:num_requests_running{{engine=\"{i}\",model_name=\"m\"}} {run}"));
                lines.push(format!("vllm:num_requests_waiting{{engine=\"{i}\",model_name=\"m\"}} {wait}"));
                lines.push(format!("vllm:kv_cache_usage_perc{{engine=\"{i}\",model_name=\"m\"}} {}", *kv as f64 / 100.0));
            }
            let text = lines.join("\n");
            // A deterministic shuffle.
            let mut shuffled = lines.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let a = parse_engine_metrics(&text, Some("m"));
            let b = parse_engine_metrics(&shuffled.join("\r\n"), None);
            let run: u32 = values.iter().map(|v| v.0).sum();
            let wait: u32 = values.iter().map(|v| v.1).sum();
            prop_assert_eq!(a.running, Some(run as f64));
            prop_assert_eq!(b.running, Some(run as f64));
            prop_assert_eq!(a.waiting, Some(wait as f64));
            prop_assert_eq!(b.waiting, Some(wait as f64));
            let kv = a.kv_usage.unwrap();
            prop_assert!((kv - b.kv_usage.unwrap()).abs() < 1e-12);
            prop_assert!((0.0..=1.0).contains(&kv));
        }
    }
}

"""Metric names shared by the Triton models and the service (the chart's autoscaling reads them)."""

# Exported by the `llm` model through pb_utils.MetricFamily (a gauge labelled model="llm").
LLM_ACTIVE_SEQUENCES = "moss_speech_llm_active_sequences"
# The llm model's KV slot count (ServingConfig.max_slots): dashboards and alerts divide by it.
LLM_KV_SLOTS = "moss_speech_llm_kv_slots"

# The llm model's KV prefix cache (model_repository/runtime/base.py): counters of lookups that reused a cached
# conversation prefix (hits) or computed the whole prompt (misses), cached entries evicted to make room, and gauges
# of the rows the cache holds now and of prompt rows not recomputed.
LLM_PREFIX_CACHE_HITS = "moss_speech_llm_prefix_cache_hits_total"
LLM_PREFIX_CACHE_MISSES = "moss_speech_llm_prefix_cache_misses_total"
LLM_PREFIX_CACHE_EVICTIONS = "moss_speech_llm_prefix_cache_evictions_total"
LLM_PREFIX_CACHE_REUSED_ROWS = "moss_speech_llm_prefix_cache_reused_rows_total"
LLM_PREFIX_CACHE_ROWS = "moss_speech_llm_prefix_cache_rows"

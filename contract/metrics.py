"""Metric names shared by the Triton models and the service (the chart's autoscaling reads them)."""

# Exported by the `llm` model through pb_utils.MetricFamily (a gauge labelled model="llm").
LLM_ACTIVE_SEQUENCES = "moss_speech_llm_active_sequences"
# The llm model's KV slot count (ServingConfig.max_slots): dashboards and alerts divide by it.
LLM_KV_SLOTS = "moss_speech_llm_kv_slots"

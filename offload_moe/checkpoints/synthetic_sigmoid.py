"""Published config.json values of the sigmoid-routed families (issue 27) for `synthetic`: the real
layer shapes of DeepSeek-V3, Kimi-K2, GLM-4.5, GLM-4.5-Air, GLM-4.7-Flash and MiniMax-M2, as
tests/data/*-config.json has them (the FP8 files' quantization_config left out: synthetic weights
are bf16, or our own packed format with `bits`)."""

_DEEPSEEK_V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                    num_key_value_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
                    num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1, topk_method="noaux_tc",
                    scoring_func="sigmoid", n_group=8, topk_group=4, norm_topk_prob=True,
                    routed_scaling_factor=2.5, rms_norm_eps=1e-6, rope_theta=10000,
                    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                    max_position_embeddings=163840, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")
_GLM_45 = dict(model_type="glm4_moe", vocab_size=151552, hidden_size=5120, intermediate_size=12288,
               moe_intermediate_size=1536, num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8,
               head_dim=128, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True, n_routed_experts=160,
               n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=1, topk_group=1,
               norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5, rope_theta=1e6,
               max_position_embeddings=131072, eos_token_id=[151329, 151336, 151338], torch_dtype="bfloat16")

SIGMOID_MODELS = {
    "deepseek-v3": _DEEPSEEK_V3,
    "kimi-k2": _DEEPSEEK_V3 | dict(model_type="kimi_k2", vocab_size=163840, num_attention_heads=64,
                                   num_key_value_heads=64, n_routed_experts=384, first_k_dense_replace=1, n_group=1,
                                   topk_group=1, routed_scaling_factor=2.827, rope_theta=50000.0,
                                   rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096,
                                                     beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                                   max_position_embeddings=131072, bos_token_id=163584, eos_token_id=163585),
    "glm-4.5": _GLM_45,
    "glm-4.5-air": _GLM_45 | dict(hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                                  num_hidden_layers=46, n_routed_experts=128, first_k_dense_replace=1,
                                  routed_scaling_factor=1.0, use_qk_norm=False),
    "glm-4.7-flash": dict(model_type="glm4_moe_lite", vocab_size=154880, hidden_size=2048, intermediate_size=10240,
                          moe_intermediate_size=1536, num_hidden_layers=47, num_attention_heads=20,
                          num_key_value_heads=20, kv_lora_rank=512, q_lora_rank=768, qk_nope_head_dim=192,
                          qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64, n_shared_experts=1,
                          num_experts_per_tok=4, first_k_dense_replace=1, n_group=1, topk_group=1,
                          norm_topk_prob=True, routed_scaling_factor=1.8, rms_norm_eps=1e-5, rope_theta=1e6,
                          max_position_embeddings=202752, eos_token_id=[154820, 154827, 154829],
                          torch_dtype="bfloat16"),
    "minimax-m2": dict(model_type="minimax_m2", vocab_size=200064, hidden_size=3072, intermediate_size=1536,
                       num_hidden_layers=62, num_attention_heads=48, num_key_value_heads=8, head_dim=128, rotary_dim=64,
                       num_local_experts=256, num_experts_per_tok=8, scoring_func="sigmoid", use_qk_norm=True,
                       qk_norm_type="per_layer", rms_norm_eps=1e-6, rope_theta=5e6, max_position_embeddings=196608,
                       torch_dtype="bfloat16"),
}

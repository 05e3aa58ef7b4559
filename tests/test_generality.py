"""Recognition follows what code computes, not how it is spelled; near misses never fuse.

Every layer in tests/spellings.py is compiled with the backend's passes, run in training
(inputs and parameters requiring grad, backward with a random upstream gradient) and in
inference; its output and every gradient are compared with eager and with a float64 copy,
and the fusion report must show the expected counts:

- ``must``: a spelling of a fused op's function; the fusion fires the expected number of
  times. A spelling the recognizers miss is kept as a strict xfail whose reason quotes the
  report (``gap``), raised only by the count check (a numerical mismatch still fails).
- ``near``: a mutation computing another function; the fusion must not fire (count 0).
- ``either``: not a promised idiom, not a near miss either (the same function up to
  constants the op cannot take as they are written, or a valid attention over other heads):
  it may fuse or not; whatever it does must match eager.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch

import ccgqa_compile

from . import spellings as sp
from ._backends import ccgqa_without_codegen
from ._compare import assert_as_close_as_eager, assert_close, rel_err

BLOCK = ("ccgqa_prologue", "gqa_attention", "ccgqa_block")


class NotFused(AssertionError):
    """A fusion count differs from what the spelling promises (a recognizer gap)."""


@dataclass(frozen=True)
class Case:
    name: str
    build: type
    expect: Mapping[str, int]  # fusion -> times per graph (training and inference)
    kind: str = "must"  # "must", "near" or "either"
    seq: int = 9
    gap: str = ""  # a known recognizer gap: strict xfail, with the report's reason
    # per fusion, the idioms it may fire as (e.g. an unweighted core, never "weighted")
    idioms: Mapping[str, frozenset] = field(default_factory=dict)
    expect_inference: Mapping[str, int] | None = None  # where inference graphs differ


def _must(name, build, seq=9, gap="", **expect):
    return Case(name, build, expect, "must", seq, gap)


def _near(name, build, seq=9, idioms=None, **expect):
    return Case(name, build, expect, "near", seq, "", idioms or {})


def _either(name, build, seq=9, **expect):
    return Case(name, build, expect, "either", seq)


def _block(n=1):
    return dict.fromkeys(BLOCK, n)


RMS_NORM = [
    _must("rms_mean_of_product", sp.RMSMeanOfProduct, rms_norm=1),
    _must("rms_pow_operator_div_sqrt_dim2", sp.RMSPowOperatorDivSqrt, seq=11, rms_norm=1),
    _must("rms_reciprocal_of_sqrt_weight_first", sp.RMSReciprocalOfSqrt, rms_norm=1),
    _must("rms_exp_of_log", sp.RMSExpOfLog, rms_norm=1),
    _must("rms_sum_over_width_weight_in_factor", sp.RMSSumOverWidth, seq=5, rms_norm=1),
    # eps = 0: the eps read off the probes is float64 noise (~1e-16); 0 is tried too
    _must("rms_norm_times_rsqrt_width_no_eps", sp.RMSNormTimesRsqrtWidth, rms_norm=1),
    _must("rms_vector_norm_squared", sp.RMSVectorNormSquared, rms_norm=1),
    _must("rms_t5_upcast_mul_method", sp.RMSMulMethodUpcast, seq=13, rms_norm=1),
    _must("rms_nn_RMSNorm_module", sp.RMSTorchModule, rms_norm=1),
    _must("rms_nn_RMSNorm_default_eps", sp.RMSTorchModuleDefaultEps, rms_norm=1),
    _must("rms_per_head_qk_norm", sp.RMSPerHeadQKNorm, rms_norm=2),
    _must("rms_parallel_block_two_norms", sp.RMSParallelBlockNorms, rms_norm=2),
    _must("rms_keepdim_false_unsqueeze", sp.RMSKeepdimFalse, rms_norm=1),
    _must("rms_eps_inside_mean", sp.RMSEpsInsideMean, rms_norm=1),
    _must("rms_of_centered_x", sp.RMSOfCentered, rms_norm=1),
    _near("rms_near_eps_outside_norm", sp.NearRMSEpsOutsideNorm, rms_norm=0),
    _near("rms_near_no_root", sp.NearRMSNoRoot, rms_norm=0),
    _near("rms_near_mean_over_heads", sp.NearRMSMeanOverHeads, rms_norm=0),
    # the norm clamped from below: the op's clamped form (zero rows give zeros)
    _must("rms_clamped_rms", sp.NearRMSClampInsteadOfEps, rms_norm=1),
    _must("rms_x_transformers_normalize", sp.RMSXTransformers, rms_norm=1),
    _must("rms_norm_clamped_min", sp.RMSNormClampedMin, rms_norm=1),
    _near("rms_near_stats_of_scaled_input", sp.NearRMSStatsOfScaledInput, rms_norm=0),
    # the genuine unweighted core may fuse; the per-token gain never as a weight
    _near(
        "rms_near_per_token_gain",
        sp.NearRMSPerTokenGain,
        seq=sp.NearRMSPerTokenGain.SEQ,
        idioms={"rms_norm": frozenset({"unweighted"})},
        rms_norm=1,
    ),
    _either("rms_sum_over_width_plus_one", sp.RMSSumOverWidthPlusOne, rms_norm=1),
    _must("rms_einsum_self_contraction", sp.RMSEinsumSelfContraction, rms_norm=1),
    _must("rms_square_times_mean_vector", sp.RMSSquareTimesMeanVector, rms_norm=1),
    _must("rms_variance_plus_mean_squared", sp.RMSVariancePlusMeanSquared, rms_norm=1),
    _near("rms_near_variance_only", sp.NearRMSVarianceOnly, rms_norm=0),
    _near("rms_near_einsum_over_tokens", sp.NearRMSEinsumOverTokens, rms_norm=0),
]

SWIGLU = [
    _must("swiglu_sigmoid_first", sp.SwiGLUSigmoidFirst, swiglu=1),
    _must("swiglu_up_times_swish_methods", sp.SwiGLUUpTimesSwish, swiglu=1),
    _must("swiglu_roles_swapped_silu_of_w3", sp.SwiGLURolesSwapped, swiglu=1),
    _must("swiglu_torch_split", sp.SwiGLUTorchSplit, swiglu=1),
    _must("swiglu_slices_second_half_gate", sp.SwiGLUSlices, seq=7, swiglu=1),
    _must("swiglu_interleaved_columns", sp.SwiGLUInterleavedHalves, swiglu=1),
    _must("swiglu_view_unbind", sp.SwiGLUUnbind, seq=5, swiglu=1),
    _must("swiglu_einsum_projections", sp.SwiGLUEinsum, swiglu=1),
    _must("swiglu_nn_SiLU_fp32_upcast", sp.SwiGLUModuleFp32, swiglu=1),
    _must("swiglu_exp_spelling", sp.SwiGLUExpSpelling, swiglu=1),
    _must("swiglu_in_place_silu_and_mul", sp.SwiGLUInPlace, swiglu=1),
    _near("swiglu_near_quick_gelu", sp.NearSwiGLUQuickGelu, swiglu=0),
    _near("swiglu_near_swish_beta", sp.NearSwiGLUSwishBeta, swiglu=0),
    _near("swiglu_near_detached_sigmoid", sp.NearSwiGLUDetachedSigmoid, swiglu=0),
    _near("swiglu_near_sum", sp.NearSwiGLUSum, swiglu=0),
]

ROPE = [
    # freqs_cis[..., 0] and [..., 1] are each indexed twice (four getitem nodes of one table)
    _must("rope_gpt_fast_freqs_cis_pairs", sp.RopeGptFast, rope=2),
    _must("rope_complex_heads_first", sp.RopeComplexHeadsFirst, seq=7, rope=2),
    _must("rope_gemma_transposed_inside", sp.RopeGemmaTransposedInside, seq=7, rope=2),
    _must("rope_deepseek_pairs_split", sp.RopeDeepSeekPairsSplit, seq=7, rope=2),
    _must("rope_olmo_tables_type_as_query", sp.RopeOlmoTablesTypeAsQuery, seq=7, rope=2),
    _near("rope_near_deepseek_pairs_split_no_turn", sp.NearRopeDeepSeekPairsSplitNoTurn, rope=0),
    _must("rope_meta_complex_tokens_first", sp.RopeMetaTokensFirst, seq=11, rope=2),
    _must("rope_hf_chunk_no_grad_tables", sp.RopeHFChunkNoGrad, seq=11, rope=2),
    _must("rope_partial_split_repeat", sp.RopePartialSplit, rope=2),
    _must("rope_half_tables_explicit", sp.RopeHalfTablesExplicit, seq=13, rope=2),
    _must("rope_einops_interleaved", sp.RopeEinopsInterleaved, rope=2),
    _must("rope_negative_angles", sp.RopeNegativeAngles, seq=11, rope=2),
    _must("rope_sign_baked_in_sin", sp.RopeSignBakedInSin, rope=2),
    _must("rope_pairs_sign_baked_in_sin", sp.RopePairsSignBakedInSin, rope=2),
    _must("rope_roll_sign_table", sp.RopeRollSignTable, rope=2),
    _near("rope_near_gpt_fast_one_sign", sp.NearRopeGptFastSign, rope=0),
    _near("rope_near_sign_baked_no_swap", sp.NearRopeSignBakedNoSwap, rope=0),
    _near("rope_near_mixed_layouts", sp.NearRopeMixedLayouts, rope=0),
    # the pairs turned, the output laid out as halves: DeepSeek-V3's layout, which the op
    # computes on x's pairs split into halves (no longer a near miss)
    _must("rope_complex_flattened_as_halves", sp.NearRopeComplexWrongFlatten, seq=7, rope=2),
    _near("rope_near_rotates_the_other_tensor", sp.NearRopeRotatesTheOtherTensor, rope=0),
]

ATTENTION = [
    _must("attn_einsum_bhtd_expand", sp.AttnEinsumExpand, gqa_attention=1),
    _must("attn_einsum_tokens_first", sp.AttnEinsumTokensFirst, seq=13, gqa_attention=1),
    _must("attn_bmm_flat_additive_mask", sp.AttnBmmFlat, seq=7, gqa_attention=1),
    _must("attn_fairseq_prescaled_query_mask_cast_like_scores", sp.AttnFairseqPrescaledQuery,
          seq=7, gqa_attention=1),  # fmt: skip
    _must("attn_query_divided_key_scaled", sp.AttnQueryDividedKeyScaled, gqa_attention=1),
    _must("attn_grouped_query_flattened_baddbmm", sp.AttnGroupedQueryFlattened, gqa_attention=1),
    _must("attn_baddbmm_beta_zero_nan_input", sp.AttnBaddbmmBetaZero, gqa_attention=1),
    _must("attn_scale_split_where_einops", sp.AttnScaleSplitWhere, gqa_attention=1),
    _must("attn_scaled_query_arange_mask", sp.AttnScaledQueryArangeMask, seq=11, gqa_attention=1),
    _must("attn_mup_scale_after_mask", sp.AttnMuPScale, gqa_attention=1),
    _must("attn_hf_eager_min_mask", sp.AttnHFEagerMinMask, seq=17, gqa_attention=1),
    _must("attn_fp32_scores", sp.AttnFp32Scores, gqa_attention=1),
    _must("attn_softmax_type_as_q", sp.AttnSoftmaxTypeAs, seq=7, gqa_attention=1),
    _must("attn_matrix_transpose_mT", sp.AttnMatrixTranspose, gqa_attention=1),
    # the tril mask is a registered buffer, a graph input: checked at run time
    _must("attn_nanogpt_buffer_mask", sp.AttnNanoGPT, seq=11, gqa_attention=1),
    _must("attn_manual_softmax", sp.AttnManualSoftmax, gqa_attention=1),
    _must("attn_manual_softmax_exp2_fp32", sp.AttnManualSoftmaxExp2, seq=11, gqa_attention=1),
    _must("attn_manual_softmax_logsumexp", sp.AttnManualSoftmaxLogsumexp, gqa_attention=1),
    _must("attn_numpy_names_special_logsumexp", sp.AttnNumpyNamesSpecialLogsumexp, gqa_attention=1),
    _must("sdpa_three_dim_flat_heads", sp.SdpaThreeDimFlatHeads, gqa_attention=1),
    _must("sdpa_causal_when_longer", sp.SdpaCausalWhenLonger, gqa_attention=1),
    # one token: left to Inductor by policy (the output is v), whatever the causal flag
    _either("sdpa_causal_when_longer_one_token", sp.SdpaCausalWhenLonger, seq=1, gqa_attention=1),
    # batch 2: one call per sequence
    _must("sdpa_three_dim_token_flat_gqa", sp.SdpaThreeDimTokenFlatGQA, gqa_attention=2),
    _near("sdpa_near_three_dim_not_causal", sp.NearSdpaThreeDimNotCausal, gqa_attention=0),
    _must("attn_megatron_baddbmm_view_written_in_place",
          sp.AttnMegatronBaddbmmViewWrittenInPlace, gqa_attention=1),  # fmt: skip
    _near("attn_near_megatron_baddbmm_view_masks_diagonal",
          sp.NearAttnMegatronBaddbmmViewMasksDiagonal, gqa_attention=0),  # fmt: skip
    _must("attn_manual_softmax_mask_after_exp", sp.AttnManualSoftmaxMaskAfterExp, gqa_attention=1),
    _must("sdpa_arange_bool_mask", sp.SdpaArangeBoolMask, gqa_attention=1),
    _must("sdpa_float_mask_einops_repeat", sp.SdpaFloatMaskEinopsRepeat, seq=7, gqa_attention=1),
    _must("sdpa_positional_expand_scale", sp.SdpaPositionalExpand, gqa_attention=1),
    _must("sdpa_buffer_mask", sp.SdpaBufferMask, seq=11, gqa_attention=1),
    _must("sdpa_transposed_in_call", sp.SdpaTransposedInCall, seq=5, gqa_attention=1),
    _must("attn_grouped_queries_5d_einsum", sp.AttnGroupedQueries, seq=9, gqa_attention=1),
    _must("attn_grouped_broadcast_matmul", sp.AttnGroupedBroadcastMatmul, gqa_attention=1),
    _must("attn_grouped_tokens_first", sp.AttnGroupedTokensFirst, seq=7, gqa_attention=1),
    _must("attn_baddbmm_falcon", sp.AttnBaddbmmFalcon, seq=11, gqa_attention=1),
    _must("attn_megatron_core", sp.AttnMegatronCore, seq=11, gqa_attention=1),
    _near("attn_near_megatron_core_peek", sp.NearAttnMegatronCorePeek, gqa_attention=0),
    _must("attn_where_full_like", sp.AttnWhereFullLike, gqa_attention=1),
    _either("attn_tiled_heads_repeat", sp.AttnTiledHeads, gqa_attention=1),
    _either("attn_grouped_query_tiled_heads", sp.AttnGroupedQueryTiledHeads, gqa_attention=1),
    # a run-time mask is checked when the op runs: it may fuse, it must compute the window
    _either("attn_nanogpt_window_buffer", sp.AttnNanoGPTWindowBuffer, seq=11, gqa_attention=1),
    _either("attn_fairseq_values_scaled", sp.AttnFairseqScaledValues, seq=7, gqa_attention=1),
    _either("attn_fairseq_values_scaled_flat", sp.AttnFairseqValuesScaledFlat, seq=7,
            gqa_attention=1),  # fmt: skip
    _either("sdpa_window_buffer_mask", sp.SdpaWindowBufferMask, seq=11, gqa_attention=1),
    _near("attn_near_sliding_window", sp.NearAttnSlidingWindow, gqa_attention=0),
    _near("attn_near_peek_additive_triu2", sp.NearAttnPeekAdditive, gqa_attention=0),
    _near("attn_near_learned_alibi", sp.NearAttnLearnedAlibi, gqa_attention=0),
    _near("attn_near_one_hole_mask", sp.NearAttnOneHoleMask, seq=13, gqa_attention=0),
    _near("sdpa_near_one_hole_mask", sp.NearSdpaOneHoleMask, seq=13, gqa_attention=0),
    _near("attn_near_mask_after_softmax", sp.NearAttnMaskAfterSoftmax, gqa_attention=0),
    _near("attn_near_softmax_over_queries", sp.NearAttnSoftmaxOverQueries, gqa_attention=0),
    _near(
        "attn_near_grouped_heads_interleaved", sp.NearAttnGroupedHeadsInterleaved, gqa_attention=0
    ),
    _near("attn_near_baddbmm_peek", sp.NearAttnBaddbmmPeek, gqa_attention=0),
    _near("attn_near_where_zero_fill", sp.NearAttnWhereZeroFill, gqa_attention=0),
    _near("attn_near_manual_detached_sum", sp.NearAttnManualDetachedSum, gqa_attention=0),
    _near("attn_near_manual_softmax_plus_one", sp.NearAttnManualSoftmaxPlusOne, gqa_attention=0),
    _near("attn_near_manual_sum_over_queries", sp.NearAttnManualSumOverQueries, gqa_attention=0),
    _near("sdpa_near_peek_mask", sp.NearSdpaPeekMask, gqa_attention=0),
    _near("sdpa_near_window_mask", sp.NearSdpaWindowMask, seq=11, gqa_attention=0),
]

CCGQA = [
    _must("ccgqa_zaya_style", sp.CCGQAZayaStyle, **_block()),
    _must("ccgqa_conv_pad_slice_einsum", sp.CCGQAConvPadSlice, seq=11, **_block()),
    _must("ccgqa_functional_interleaved", sp.CCGQAFunctionalInterleaved, **_block()),
    _must("ccgqa_einops", sp.CCGQAEinops, seq=7, **_block()),
    _must("ccgqa_hf_eager_no_grad_tables", sp.CCGQAHFEager, **_block()),
    _must("ccgqa_shared_conv_bmm_buffers", sp.CCGQASharedConvBmm, seq=13, **_block()),
    _must("ccgqa_rope_before_norm", sp.CCGQARopeBeforeNorm, **_block()),
    _must("ccgqa_rope_before_norm_buffer_tables", sp.CCGQARopeBeforeNormBufferTables, **_block()),
    _must("ccgqa_conv_biases_added_apart", sp.CCGQAConvBiasesAddedApart, **_block()),
    _must("ccgqa_zaya_style_biases_added_apart", sp.CCGQAZayaStyleBiasesAddedApart, **_block()),
    _must("ccgqa_rope_tables_read_in_halves", sp.CCGQARopeTablesReadInHalves, **_block()),
    _must("ccgqa_buffer_rows_sliced_per_stream", sp.CCGQABufferRowsSlicedPerStream, **_block()),
    # as many tokens as kv heads: the temperature (1, Hkv, 1, 1) is no RoPE table
    _must("ccgqa_as_many_tokens_as_kv_heads", sp.CCGQAConvPadSlice, seq=2, **_block()),
    _must("ccgqa_rope_negative_angles", sp.CCGQARopeNegativeAngles, **_block()),
    _must("ccgqa_rope_written_into_buffer", sp.CCGQARopeWrittenIntoBuffer, **_block()),
    _must("ccgqa_sequence_first", sp.CCGQASequenceFirst, **_block()),
    _must("ccgqa_k_repeated_before_norm", sp.CCGQARepeatBeforeNorm, **_block()),
    _must("ccgqa_temperature_on_query", sp.CCGQATemperatureOnQuery, **_block()),
    _must("ccgqa_temperature_gathered_onto_query", sp.CCGQATemperatureGatheredOntoQuery, **_block()),
    _must("ccgqa_norm_scale_on_key_only", sp.CCGQANormScaleOnKeyOnly, **_block()),
    _must("ccgqa_temperature_on_scores", sp.CCGQATemperatureOnScores, **_block()),
    _must("ccgqa_temperature_sqrt_on_both", sp.CCGQATemperatureSqrtOnBoth, **_block()),
    _must("ccgqa_fused_qkv_one_conv", sp.CCGQAFusedQKVOneConv, **_block()),
    _must(
        "ccgqa_tokens_first_sdpa_mask",
        sp.CCGQATokensFirstSdpaMask,
        seq=5,
        # RoPE on (B, T, H, D) with (T, 1, D) tables
        **_block(),
    ),
    # cos/sin computed once for q and once for k: four table leaves of two values
    _must("ccgqa_tables_per_tensor", sp.CCGQATablesPerTensor, **_block()),
    # the same, each call slicing buffers: four runtime table leaves of two computations
    _must("ccgqa_buffer_tables_per_call", sp.CCGQABufferTablesPerCall, **_block()),
    # the leaf is sqrt(d) * exp(t): read as the temperature times the norm scale
    _must("ccgqa_temperature_in_norm_scale", sp.CCGQATemperatureInNormScale, **_block()),
    _must("ccgqa_grouped_scores_complex_rope", sp.CCGQAGroupedScoresComplexRope, seq=9, **_block()),
    _must("ccgqa_norm_plus_eps", sp.CCGQANormPlusEps, **_block()),
    _must("ccgqa_rsqrt_sum_plus_eps", sp.CCGQARsqrtSumPlusEps, seq=7, **_block()),
    _must("ccgqa_conv_taps_written_out", sp.CCGQAConvTapsWrittenOut, **_block()),
    _must("ccgqa_conv_unfold_windows", sp.CCGQAConvUnfoldWindows, seq=7, **_block()),
    _must("ccgqa_conv_stacked_shifts_einsum", sp.CCGQAConvStackedShiftsEinsum, **_block()),
    _must("ccgqa_conv_sums_of_cat_shifts", sp.CCGQAConvSumsOfCatShifts, **_block()),
    _must("ccgqa_conv_unfold_grouped_flax", sp.CCGQAConvUnfoldGroupedFlax, seq=7, **_block()),
    _must("ccgqa_conv2d_unit_height", sp.CCGQAConv2dUnitHeight, **_block()),
    _must("ccgqa_rope_on_last_dims", sp.CCGQARopeOnLastDims, **_block()),
    _must("ccgqa_rms_norm_on_heads", sp.CCGQARmsNormOnHeads, **_block()),
    _must("ccgqa_rms_norm_modules_default_eps", sp.CCGQARmsNormModuleOnHeads, **_block()),
    _must("ccgqa_flat_token_projections", sp.CCGQAFlatTokenProjections, **_block()),
    _must("ccgqa_packed_grouped_qkv", sp.CCGQAPackedGroupedQKV, **_block()),
    _must(
        "ccgqa_grouped_query_tables_viewed_per_stream",
        sp.CCGQAGroupedQueryTablesViewedPerStream,
        **_block(),
    ),
    _must("ccgqa_megatron_tokens_first", sp.CCGQAMegatronTokensFirst, **_block()),
    _must("ccgqa_conv_zero_state_buffer", sp.CCGQAConvZeroStateBuffer, **_block()),
    _must("ccgqa_conv_stages_cat_zeros_biases", sp.CCGQAConvStagesCatZerosBiases, **_block()),
    _must("ccgqa_sine_first_keys_read_twice", sp.CCGQASineFirstKeysReadTwice, **_block()),
    _must("ccgqa_torchtune_rope_cache", sp.CCGQATorchtuneRopeCache, **_block()),
    _must("ccgqa_fairseq_core", sp.CCGQAFairseqCore, **_block()),
    _must("ccgqa_token_flat_no_batch", sp.CCGQATokenFlatNoBatch, seq=5, **_block()),
    _must("ccgqa_token_flat_three_dim_sdpa", sp.CCGQATokenFlatThreeDimSdpa, seq=5, **_block()),
    _must("ccgqa_logit_scale_buffer", sp.CCGQALogitScaleBuffer, **_block()),
    _must("ccgqa_numerics_careful", sp.CCGQANumericsCareful, **_block()),
    _must("ccgqa_logit_scale_of_another_dtype", sp.CCGQALogitScaleOtherDtype, **_block()),
    # block-level near misses: the attention core is genuine (it fuses); the prologue and
    # so the whole block must not
    _near("ccgqa_near_pad_right", sp.NearCCGQAPadRight, ccgqa_prologue=0, ccgqa_block=0),
    _near("ccgqa_near_token_flat_conv_not_causal", sp.NearCCGQATokenFlatConvNotCausal, seq=5,
          ccgqa_prologue=0, ccgqa_block=0),  # fmt: skip
    _near(
        "ccgqa_near_fused_qkv_conv_mixes_heads", sp.NearCCGQAFusedQKVConvMixesHeads,
        ccgqa_prologue=0, ccgqa_block=0,
    ),
    _near("ccgqa_near_shift_by_two", sp.NearCCGQAShiftByTwo, ccgqa_prologue=0, ccgqa_block=0),
    _near("ccgqa_near_conv_stages_cat_zeros_delayed", sp.NearCCGQAConvStagesCatZerosOneTooMany,
          ccgqa_prologue=0, ccgqa_block=0),  # fmt: skip
    _near(
        "ccgqa_near_rms_norm_over_all_heads",
        sp.NearCCGQARmsNormOverAllHeads,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_rope_last_dims_on_q_first_dims_on_k",
        sp.NearCCGQARopeLastDimsOnQFirstDimsOnK,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_conv_taps_see_next_token",
        sp.NearCCGQAConvTapsSeeNextToken,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_conv_stacked_shifts_see_next_token",
        sp.NearCCGQAConvStackedShiftsSeeNextToken,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_conv_bias_per_position",
        sp.NearCCGQAConvBiasPerPosition,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_rope_before_norm_sin_off_by_one",
        sp.NearCCGQARopeBeforeNormSinOffByOne,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_temperature_per_query_head",
        sp.NearCCGQATemperaturePerQueryHead,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_temperature_per_query_head_on_scores",
        sp.NearCCGQATemperaturePerQueryHeadOnScores,
        gqa_attention=1,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_temperature_on_query_keys_read_elsewhere",
        sp.NearCCGQATemperatureOnQueryKeysReadElsewhere,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_repeated_k_per_query_head_temperature",
        sp.NearCCGQARepeatBeforeNormPerQueryHeadTemperature,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_sequence_first_conv_over_batch",
        sp.NearCCGQASequenceFirstConvOverBatch,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_rope_buffer_half_written",
        sp.NearCCGQARopeBufferHalfWritten,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_buffer_tables_key_off_by_one",
        sp.NearCCGQABufferTablesKeyOffByOne,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),

    _near(
        "ccgqa_near_symmetric_padding",
        sp.NearCCGQASymmetricPadding,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_mean_over_all_heads",
        sp.NearCCGQAMeanOverAllHeads,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_tiled_k_in_mean",
        sp.NearCCGQATiledKInMean,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near(
        "ccgqa_near_mean_without_half",
        sp.NearCCGQAMeanWithoutHalf,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    _near("ccgqa_near_norm_over_heads", sp.NearCCGQANormOverHeads, ccgqa_prologue=0, ccgqa_block=0),
    _near(
        "ccgqa_near_per_token_temperature",
        sp.NearCCGQAPerTokenTemperature,
        ccgqa_prologue=0,
        ccgqa_block=0,
    ),
    # the genuine prologue fuses; a non-causal attention must not, nor the block
    _near(
        "ccgqa_near_non_causal_sdpa",
        sp.CCGQANonCausalSdpa,
        ccgqa_prologue=1,
        gqa_attention=0,
        ccgqa_block=0,
    ),
]

CASES = RMS_NORM + SWIGLU + ROPE + ATTENTION + CCGQA

# the real backend (Inductor's C++ code generation included) on a few of them
REAL_BACKEND = (
    "rms_vector_norm_squared",
    "swiglu_torch_split",
    "rope_hf_chunk_no_grad_tables",
    "attn_einsum_tokens_first",
    "ccgqa_zaya_style",
    "ccgqa_conv_pad_slice_einsum",
    "ccgqa_near_pad_right",
)
BY_NAME = {c.name: c for c in CASES}


def _params(cases):
    out = []
    for case in cases:
        marks = []
        if case.gap:
            marks.append(pytest.mark.xfail(strict=True, raises=NotFused, reason=case.gap))
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def _compile_and_compare(case: Case, training: bool, backend, device="cpu", dtype=torch.float32):
    """Compiled vs eager vs a float64 copy: the output and, in training, the gradient of
    the input and of every parameter. Returns the fusion report."""
    torch.manual_seed(0)
    model = case.build().train(training).to(device)
    eager = copy.deepcopy(model).to(dtype)
    reference = copy.deepcopy(model).double()
    model = model.to(dtype)
    x = torch.randn(2, case.seq, model.DIM, device=device).to(dtype)
    x_c, x_e = (x.clone().requires_grad_(training) for _ in range(2))
    x_r = x.double().requires_grad_(training)

    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.set_grad_enabled(training):
        out_c = compiled(x_c)
        out_e = eager(x_e)
        out_r = reference(x_r)
    rep = ccgqa_compile.report()
    kinds = {g.kind for g in rep.graphs}
    assert kinds == {"training" if training else "inference"}, f"{kinds}\n{rep}"

    assert_as_close_as_eager(out_c, out_e, out_r, dtype, f"{case.name} output\n{rep}")
    if training:
        grad_out = torch.randn_like(out_r).to(dtype)
        names = ["x", *(n for n, _ in model.named_parameters())]
        grads_c = torch.autograd.grad(
            out_c, [x_c, *model.parameters()], grad_out, allow_unused=True
        )
        grads_e = torch.autograd.grad(
            out_e, [x_e, *eager.parameters()], grad_out, allow_unused=True
        )
        grads_r = torch.autograd.grad(
            out_r, [x_r, *reference.parameters()], grad_out.double(), allow_unused=True
        )
        for name, gc, ge, gr in zip(names, grads_c, grads_e, grads_r):
            assert (gc is None) == (ge is None), (
                f"{case.name}: the gradient of {name} is "
                f"{'missing' if gc is None else 'present'} in the compiled model and "
                f"{'missing' if ge is None else 'present'} in eager\n{rep}"
            )
            if ge is not None:
                assert_as_close_as_eager(
                    gc,
                    ge,
                    gr,
                    dtype,
                    f"{case.name} grad of {name}\n{rep}",
                    ill_conditioned="temp" in name,
                )
    return rep


def _check_counts(case: Case, rep, training: bool):
    expect = case.expect
    if not training and case.expect_inference is not None:
        expect = case.expect_inference
    for fusion, times in expect.items():
        fired = rep.count(fusion)
        if case.kind == "either":
            assert fired in (0, times), f"{case.name}: {fusion} fired {fired}x\n{rep}"
        elif case.kind == "near":
            # a near miss that fuses is a false match: a plain failure, never an xfail
            assert fired == times, (
                f"FALSE MATCH {case.name}: {fusion} fired {fired}x, expected {times}\n{rep}"
            )
        elif fired != times:
            raise NotFused(f"{case.name}: {fusion} fired {fired}x, expected {times}\n{rep}")
        if training and fired and case.kind == "must":
            assert not rep.forward_only().get(fusion), (
                f"{case.name}: {fusion} fused without its backward\n{rep}"
            )
    for fusion, allowed in case.idioms.items():
        fired_as = {idiom for (name, idiom) in rep.idioms() if name == fusion}
        assert fired_as <= allowed, f"{case.name}: {fusion} fired as {fired_as}\n{rep}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("case", _params(CASES))
def test_spelling(case, training):
    rep = _compile_and_compare(case, training, ccgqa_without_codegen)
    _check_counts(case, rep, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("case", _params([BY_NAME[n] for n in REAL_BACKEND]))
def test_spelling_with_the_real_backend(case, training):
    rep = _compile_and_compare(case, training, "ccgqa")
    _check_counts(case, rep, training)


# every attention spelling in half precision on the GPU: the probes run in float64 there
# too, whatever casts the region holds; the ops run their Triton kernels
ATTENTION_GPU = [c for c in ATTENTION if c.kind in ("must", "near")]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("case", _params(ATTENTION_GPU))
def test_attention_spelling_cuda_half(case, training, dtype):
    # head dim 16: the smallest with a GPU kernel (SDPA keeps d = 8 there, by policy)
    build = type(case.build.__name__, (case.build,), {"HEAD_DIM": 16})
    case = dataclasses.replace(case, build=build)
    with torch.no_grad():
        try:
            out = build().to("cuda", dtype)(torch.randn(2, case.seq, build.DIM, device="cuda", dtype=dtype))
        except RuntimeError as why:  # a float32 table promotes the scores: not our concern
            pytest.skip(f"the spelling itself fails in {dtype}: {str(why)[:80]}")
    if not torch.isfinite(out).all():
        pytest.skip(f"the spelling itself overflows in {dtype}")
    rep = _compile_and_compare(case, training, ccgqa_without_codegen, "cuda", dtype)
    _check_counts(case, rep, training)


# every attention spelling at a wide head dim on the GPU: recognised hand-written attention
# runs on SDPA's kernels there (config.HANDWRITTEN_ATTENTION_CORE), SDPA calls stay SDPA's
@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("case", _params(ATTENTION_GPU))
def test_attention_spelling_cuda_wide_heads(case, training):
    build = type(case.build.__name__, (case.build,), {"HEAD_DIM": 64})
    case = dataclasses.replace(case, build=build)
    try:
        rep = _compile_and_compare(case, training, ccgqa_without_codegen, "cuda", torch.bfloat16)
    except RuntimeError as why:  # a float32 table promotes the scores: not our concern
        pytest.skip(f"the spelling itself fails in bf16: {str(why)[:80]}")
    # no plain causal hand-written attention is left on our core (a runtime mask keeps the
    # masked op, which checks the mask when it runs)
    assert ("gqa_attention", "handwritten") not in rep.idioms(), str(rep)
    if case.kind == "near":
        _check_counts(case, rep, training)
    elif not any("left to SDPA" in r.reason for r in rep.rejected):
        expect = case.expect_inference if not training and case.expect_inference else case.expect
        assert rep.count("gqa_attention") == expect.get("gqa_attention", 0), str(rep)


# every other spelling (norms, SwiGLU, RoPE, whole CCGQA blocks) in bf16 on the GPU, where
# the ops run their Triton kernels; CCGQA blocks at head dim 16, the smallest the prologue
# and attention kernels take
@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("case", _params(RMS_NORM + SWIGLU + ROPE + CCGQA))
def test_spelling_cuda_bf16(case, training):
    build = case.build
    if hasattr(build, "D"):
        build = type(build.__name__, (build,), {"D": 16})
        case = dataclasses.replace(case, build=build)
    with torch.no_grad():
        try:
            build().to("cuda", torch.bfloat16)(
                torch.randn(2, case.seq, build.DIM, device="cuda", dtype=torch.bfloat16)
            )
        except RuntimeError as why:  # a float32 table promotes the values: not our concern
            pytest.skip(f"the spelling itself fails in bf16: {str(why)[:80]}")
    rep = _compile_and_compare(case, training, ccgqa_without_codegen, "cuda", torch.bfloat16)
    _check_counts(case, rep, training)


# ---- baddbmm scores: split to be parsed, restored as written where nothing fuses ----------


@pytest.mark.parametrize(
    "build, fused", [(sp.AttnBaddbmmFalcon, True), (sp.NearAttnBaddbmmPeek, False)]
)
def test_baddbmm_scores_are_restored_where_nothing_fuses(build, fused):
    from ccgqa_compile.backend import _pass_patches

    graphs = []

    def pre_grad_only(gm, example_inputs):
        _pass_patches(set())["pre_grad_custom_pass"](gm.graph)
        gm.recompile()
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    model = build().eval()
    x = torch.randn(2, 9, model.DIM)
    with torch.no_grad():
        out = torch.compile(model, backend=pre_grad_only, fullgraph=True)(x)
        torch.testing.assert_close(out, model(x))
    (graph,) = graphs
    baddbmm = [n for n in graph.nodes if n.target is torch.baddbmm]
    fused_ops = [n for n in graph.nodes if "ccgqa" in str(n.target)]
    assert (len(baddbmm), bool(fused_ops)) == ((0, True) if fused else (1, False)), str(graph)


# ---- where the L2 norm's eps sits: fused as that, not as the clamp it nearly equals ---------


@pytest.mark.parametrize(
    "build, idiom",
    [(sp.CCGQANormPlusEps, "eps_add"), (sp.CCGQARsqrtSumPlusEps, "eps_sqrt")],
    ids=["plus_eps", "rsqrt_sum_plus_eps"],
)
def test_prologue_reports_where_the_norms_eps_sits(build, idiom):
    case = Case("eps", build, dict.fromkeys(BLOCK, 1), seq=7)
    rep = _compile_and_compare(case, True, ccgqa_without_codegen)
    fired_as = [i for (name, i) in rep.idioms() if name == "ccgqa_prologue"]
    assert fired_as and all(i.endswith(idiom) for i in fired_as), str(rep)


def test_prologue_reports_negative_angles_of_tokens_first_tables():
    """Tables read (T, 1, 1, r) (a form named after the turn's direction) still report
    the negative angles."""
    case = Case("negative", sp.CCGQAMegatronNegativeAngles, dict.fromkeys(BLOCK, 1), seq=7)
    rep = _compile_and_compare(case, True, ccgqa_without_codegen)
    fired_as = [i for (name, i) in rep.idioms() if name == "ccgqa_prologue"]
    assert fired_as and all("negative_angles" in i for i in fired_as), str(rep)


# ---- dropout: in training the op would drop the dropout; in eval it must fuse ---------------


@pytest.mark.parametrize("build", [sp.SdpaDropout, sp.AttnDropout], ids=["sdpa", "handwritten"])
def test_attention_dropout_in_training_is_not_fused(build):
    """p = 0.5 in training: the fused op has no dropout, so the attention must stay as
    written, random (two calls differ, and differ from the dropout-free output), with
    finite gradients. In eval mode the same module fuses and matches eager."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 9, model.DIM, requires_grad=True)
    compiled = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)
    out1, out2 = compiled(x), compiled(x)
    rep = ccgqa_compile.report()
    assert rep.count("gqa_attention") == 0, f"FALSE MATCH: dropout fused away\n{rep}"
    with torch.no_grad():
        plain = copy.deepcopy(model).eval()(x)
    assert rel_err(out1, out2) > 1e-2 and rel_err(out1, plain) > 1e-2, "dropout was not applied"
    grads = torch.autograd.grad(out1, [x, *model.parameters()], torch.randn_like(out1))
    assert all(torch.isfinite(g).all() for g in grads)

    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    model.eval()
    compiled = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)
    with torch.no_grad():
        out_c, out_e = compiled(x), copy.deepcopy(model)(x)
        out_r = copy.deepcopy(model).double()(x.double())
    assert_as_close_as_eager(out_c, out_e, out_r, torch.float32, "eval output")
    assert ccgqa_compile.report().count("gqa_attention") == 1, str(ccgqa_compile.report())


def test_mask_causal_at_one_length_only():
    """A mask that is causal at T = 9 only: the graph compiled for 9 tokens may fuse (it is
    causal attention there); the graphs for 11 and 13 tokens (one static, then a dynamic
    one) must not, and every output and gradient matches eager."""
    torch.manual_seed(0)
    model = sp.AttnCausalAtNineTokensOnly()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=ccgqa_without_codegen, fullgraph=True)
    for t in (9, 11, 13):
        x = torch.randn(2, t, model.DIM)
        x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_c, out_e = compiled(x_c), eager(x_e)
        rep = ccgqa_compile.report()
        assert rel_err(out_c, out_e) < 2e-5, f"T={t}\n{rep}"
        grad = torch.randn_like(out_e)
        g_c = torch.autograd.grad(out_c, [x_c, *model.parameters()], grad)
        g_e = torch.autograd.grad(out_e, [x_e, *eager.parameters()], grad)
        assert all(rel_err(a, b) < 2e-5 for a, b in zip(g_c, g_e)), f"T={t}\n{rep}"
    rep = ccgqa_compile.report()
    assert len(rep.graphs) >= 2, str(rep)
    assert rep.graphs[0].count("gqa_attention") == 1, str(rep)
    for graph in rep.graphs[1:]:
        assert graph.count("gqa_attention") == 0, f"FALSE MATCH beyond T = 9\n{rep}"


def test_case_names_are_unique_and_every_fusion_has_near_misses():
    assert len(BY_NAME) == len(CASES)
    for fusion in ("rms_norm", "swiglu", "rope", "gqa_attention", "ccgqa_prologue"):
        near = [c for c in CASES if c.kind == "near" and fusion in c.expect]
        assert len(near) >= 3, fusion


def _grouped_attention(q, k, v, mask):
    """Grouped scores (q viewed (B, Hkv, G, T, D)) masked by a 5-D run-time mask."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    s = torch.einsum("bjgtd,bjsd->bjgts", q.view(b, hkv, h // hkv, t, d), k) / d**0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bjgts,bjsd->bjgtd", s.softmax(-1), v).reshape(b, h, t, d)


@pytest.mark.parametrize("per_kv_head", [False, True], ids=["padding", "per-kv-head"])
def test_grouped_scores_with_a_5d_runtime_mask(per_kv_head):
    """A padding mask broadcast over (Hkv, G), or a mask per kv head: the op reads it per
    query head (h = j * G + g), and the output and gradients equal eager's."""
    torch.manual_seed(0)
    b, hq, hkv, t, d = 2, 6, 2, 10, 8
    q, k, v = (torch.randn(b, h, t, d) for h in (hq, hkv, hkv))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if per_kv_head:  # kv head 1 also hides the first key from the rows after it
        extra = torch.ones(1, hkv, 1, t, t, dtype=torch.bool)
        extra[0, 1, 0, 1:, 0] = False
        mask = causal & extra
    else:
        pad = torch.ones(b, t, dtype=torch.bool)
        pad[1, :3] = False  # left padding: rows 0..2 of batch 1 see nothing but themselves
        mask = causal[None, None, None] & pad[:, None, None, None, :]
        mask = mask | torch.eye(t, dtype=torch.bool)
    rep = _qkv_compiled_vs_eager(lambda q, k, v: _grouped_attention(q, k, v, mask), q, k, v)
    assert rep.idioms() == {("gqa_attention", "handwritten_runtime_mask"): 1}, str(rep)


def _qkv_compiled_vs_eager(fn, q, k, v):
    """``fn(q, k, v)`` compiled (no code generation) against eager: the output and the
    gradients of q, k and v. Returns the report."""
    got_in = [x.clone().requires_grad_() for x in (q, k, v)]
    want_in = [x.clone().requires_grad_() for x in (q, k, v)]
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    got = torch.compile(fn, backend=ccgqa_without_codegen, fullgraph=True)(*got_in)
    want = fn(*want_in)
    assert rel_err(got, want) < 1e-5
    g_out = torch.randn_like(want)
    for gc, ge in zip(torch.autograd.grad(got, got_in, g_out), torch.autograd.grad(want, want_in, g_out)):
        assert rel_err(gc, ge) < 1e-5
    return ccgqa_compile.report()


class BaddbmmBufferMask(torch.nn.Module):
    """Scores as bmm rows (B*H, T, T): ``baddbmm`` of an additive mask made from a bool
    buffer and expanded to every row, K/V repeated, ``bmm`` output."""

    def __init__(self, heads=4, kv_heads=2, max_len=16):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.register_buffer("keep", torch.ones(max_len, max_len, dtype=torch.bool).tril())

    def forward(self, q, k, v):
        b, h, t, d = q.shape
        g = h // k.shape[1]
        k, v = (x.repeat_interleave(g, 1).reshape(b * h, t, d) for x in (k, v))
        bias = torch.zeros(t, t, dtype=q.dtype).masked_fill(~self.keep[:t, :t], float("-inf"))
        s = torch.baddbmm(bias.expand(b * h, t, t), q.reshape(b * h, t, d), k.transpose(1, 2), alpha=d**-0.5)
        return torch.bmm(s.softmax(-1), v).view(b, h, t, d)


def test_bmm_rows_masked_by_a_buffer_fuse():
    """The mask comes in as a buffer, laid out like the (B*H, T, T) scores: the op reads it
    as (B, H, T, T); outputs and gradients equal eager's."""
    torch.manual_seed(0)
    model = BaddbmmBufferMask()
    q, k, v = (torch.randn(2, h, 9, 8) for h in (4, 2, 2))
    rep = _qkv_compiled_vs_eager(model, q, k, v)
    assert rep.idioms() == {("gqa_attention", "handwritten_runtime_mask"): 1}, str(rep)


# ---- einops calls Dynamo keeps whole ------------------------------------------------------

_EINOPS_OPAQUE = """
import sys, einops, torch
for f in (einops.rearrange, einops.repeat, einops.reduce, einops.einsum):
    torch._dynamo.allow_in_graph(f)  # what Dynamo does for einops 0.8 before torch 2.12
from tests import test_generality as tg
from tests._backends import ccgqa_without_codegen
for name in sys.argv[1:]:
    case = tg.BY_NAME[name]
    for training in (False, True):
        rep = tg._compile_and_compare(case, training, ccgqa_without_codegen)
        tg._check_counts(case, rep, training)
        print(name, training, dict(rep.counts()))
"""


def test_einops_calls_kept_whole_by_dynamo_are_written_out():
    """Where Dynamo keeps einops calls as single opaque nodes (torch 2.11 with einops 0.8:
    allow_in_graph), the conv layouts and head views inside them are written out as the
    torch ops einops runs, and the einops spellings fuse as when Dynamo traces einops (the
    CCGQA block's prologue and the RoPE did not). In a subprocess: allow_in_graph is global."""
    import os
    import subprocess
    import sys

    names = [c.name for c in CASES if "einops" in c.name]
    assert "ccgqa_einops" in names and "rope_einops_interleaved" in names
    env = {**os.environ, "CCGQA_FUSE_ON_CPU": "1", "CCGQA_STRICT": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _EINOPS_OPAQUE, *names],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("\n") == 2 * len(names), done.stdout


class _CCGQASoftmaxOverQueries(sp.CCGQAConvPadSlice):
    """A CCGQA block whose written-out attention normalises over the queries: not causal
    GQA, so no site stands for it."""

    def attend(self, q, k, v):
        g = self.HQ // self.HKV
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.D**-0.5
        t = q.shape[2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-2)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)


def test_a_block_whose_attention_is_not_recognised_says_so():
    """q/k convolutions feeding an attention the attention pass rejected: the report says
    why no prologue or block was tried, instead of nothing."""
    case = Case("ccgqa_softmax_over_queries", _CCGQASoftmaxOverQueries, dict.fromkeys(BLOCK, 0), "near")
    rep = _compile_and_compare(case, False, ccgqa_without_codegen)
    _check_counts(case, rep, False)
    lines = [u for u in rep.unfused_candidates if u.fusion == "ccgqa_block"]
    assert any("not recognised as causal grouped-query attention" in u.reason for u in lines), str(rep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rms_norm_default_eps_of_half_inputs_is_float32s(dtype):
    """``nn.RMSNorm`` with ``eps=None`` on half inputs adds float32's machine epsilon (ATen
    computes in float32), not the half type's (bf16's is 2**-7): on rows of small norm the
    two give outputs that differ by far more than rounding. The fused norm agrees with
    eager there."""
    torch.manual_seed(0)
    model = torch.nn.RMSNorm(40).to(dtype)
    x = (torch.randn(3, 5, 40) * 1e-3).to(dtype)
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    compiled = torch.compile(model, backend="ccgqa")
    with torch.no_grad():
        assert_close(compiled(x), model(x), dtype, "nn.RMSNorm(eps=None) on small rows")
    assert ccgqa_compile.report().count("rms_norm") == 1, str(ccgqa_compile.report())


def test_prologue_reason_for_a_norm_over_the_wrong_axis():
    """A near miss whose L2 norm spans the heads (not each head's dims) is reported for
    that, not as a temperature that matches no input."""
    torch.manual_seed(0)
    model = sp.NearCCGQANormOverHeads()
    torch._dynamo.reset()
    ccgqa_compile.reset_report()
    compiled = torch.compile(model, backend="ccgqa")
    with torch.no_grad():
        compiled(torch.randn(2, 9, model.DIM))
    rep = ccgqa_compile.report()
    reasons = [r.reason for r in rep.rejected if r.fusion == "ccgqa_prologue"]
    assert reasons and all("not of one norm per head" in r for r in reasons), str(rep)

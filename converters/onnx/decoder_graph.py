"""Our own ONNX builder: a decoder written straight from the Hugging Face weights as the graph ONNX Runtime decodes
fastest on CPU, with its fused contrib operators instead of a traced export's thousands of shape ops.

Per layer: (Skip)SimplifiedLayerNormalization (RMSNorm with the residual add fused in), one MatMul for q, k and v
together, GroupQueryAttention (rotary embedding applied inside from cos/sin tables, KV cache read and written in
a buffer that past and present share), the output projection, then the MLP with gate and up in one MatMul and
a fused activation (QuickGelu with alpha 1 is SiLU; FastGelu is GELU's tanh form). Linear weights are float32
MatMuls or MatMulNBits blocks of 4 or 8 bits (`accuracy_level` 4: int8 activations on CPU), as the precision plan
says per projection; a quantized embedding is GatherBlockQuantized, sharing the output head's blocks when the
model ties them.

The interface is onnxruntime-genai's: input_ids and attention_mask (int64), past_key_values.N.key/value
(batch, kv heads, cache length, head dim), outputs logits and present.N.key/value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters.hf_model import HFModelDir
from converters.onnx.block_quant import (
    BlockQuantized,
    dequantize_blocks,
    quantize_blocks,
    quantize_blocks_with_minimum,
)
from converters.onnx.decoder_spec import DecoderSpec
from edgepack.core.onnx_folder import GRAPH_KIND, GRAPH_METADATA_KEY

OPSET = 21


@dataclass(frozen=True)
class WeightPrecision:
    bits: int | None = None  # None: float32
    block_size: int = 32
    # "nearest": each block's min..max range, rounded to nearest; "search": the range and scale searched for the
    # least error weighted by the columns' activations on the calibration text
    rounding: str = "nearest"
    block_minimum: bool = False  # a float minimum per block (Q4_1's form) instead of an integer zero point

    def describe(self) -> str:
        if self.bits is None:
            return "fp32"
        return f"{self.bits}-bit/{self.block_size}{'+min' if self.block_minimum else ''} {self.rounding}"


@dataclass(frozen=True)
class PrecisionPlan:
    """What each weight becomes: every block projection `linear` unless `overrides` names its role (q, k, v, o,
    gate, up, down), the output head `head`, the token embedding `embedding`."""

    linear: WeightPrecision = WeightPrecision()
    overrides: dict[str, WeightPrecision] = field(default_factory=dict)
    head: WeightPrecision = WeightPrecision()
    embedding: WeightPrecision = WeightPrecision()
    accuracy_level: int = 4

    def for_role(self, role: str) -> WeightPrecision:
        return self.overrides.get(role, self.linear)

    def describe(self) -> str:
        parts = [f"linear {self.linear.describe()}"]
        parts += [f"{role} {precision.describe()}" for role, precision in sorted(self.overrides.items())]
        parts += [f"lm_head {self.head.describe()}", f"embedding {self.embedding.describe()}"]
        return ", ".join(parts)


@dataclass(frozen=True)
class CalibrationStats:
    """What the calibration text's activations look like at each linear layer's input: the mean square of each
    input column, by Hugging Face module name."""

    importance: dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorReport:
    """One weight as written: for the per-tensor table of a variant."""

    name: str
    shape: tuple[int, ...]
    precision: str
    bytes: int
    rms_error: float  # root mean square of (written - original) over the weight, 0 for float32


class _Graph:
    """Nodes and initializers collected in order, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.weight(name, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "",
           **attributes) -> list[str]:
        names = [f"{name}/out{index}" if index else f"{name}/out" for index in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain or None, **attributes))
        return names

    def op1(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attributes) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attributes)[0]


class DecoderGraphBuilder:
    """Reads weights from `model` one at a time and writes the graph for `spec` under `plan`."""

    def __init__(self, model: HFModelDir, spec: DecoderSpec, plan: PrecisionPlan,
                 calibration: CalibrationStats | None = None) -> None:
        self.model, self.spec, self.plan = model, spec, plan
        self.calibration = calibration or CalibrationStats({})
        self.graph = _Graph()
        self.report: list[TensorReport] = []
        self._head_blocks: BlockQuantized | None = None
        self._sums: dict[tuple[str, int], str] = {}

    # -- weights --------------------------------------------------------------------------------

    def _read(self, name: str) -> np.ndarray:
        return self.model.read_tensor(name).float().numpy()

    def _norm_weight(self, hf_name: str, graph_name: str) -> str:
        return self.graph.weight(graph_name, self._read(hf_name) + np.float32(self.spec.norm_offset))

    def _layer_weights(self, layer: int) -> dict[str, tuple[np.ndarray, str]]:
        """Each projection role's (out, in) weight and the module whose input statistics weigh it."""
        prefix = f"model.layers.{layer}"
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        if self.spec.packed_qkv_name:
            qkv = self._read(f"{attn}.qkv_proj.weight")
            q_end, k_end = self.spec.q_size, self.spec.q_size + self.spec.kv_size
            gate_up = self._read(f"{mlp}.gate_up_proj.weight")
            half = gate_up.shape[0] // 2
            return {"q": (qkv[:q_end], f"{attn}.qkv_proj"), "k": (qkv[q_end:k_end], f"{attn}.qkv_proj"),
                    "v": (qkv[k_end:], f"{attn}.qkv_proj"), "o": (self._read(f"{attn}.o_proj.weight"),
                                                                  f"{attn}.o_proj"),
                    "gate": (gate_up[:half], f"{mlp}.gate_up_proj"), "up": (gate_up[half:], f"{mlp}.gate_up_proj"),
                    "down": (self._read(f"{mlp}.down_proj.weight"), f"{mlp}.down_proj")}
        modules = {"q": f"{attn}.q_proj", "k": f"{attn}.k_proj", "v": f"{attn}.v_proj", "o": f"{attn}.o_proj",
                   "gate": f"{mlp}.gate_proj", "up": f"{mlp}.up_proj", "down": f"{mlp}.down_proj"}
        return {role: (self._read(f"{module}.weight"), module) for role, module in modules.items()}

    def _quantize(self, weight: np.ndarray, precision: WeightPrecision, module: str) -> BlockQuantized:
        if precision.block_minimum and weight.shape[1] % precision.block_size == 0:
            return quantize_blocks_with_minimum(weight, precision.bits, precision.block_size,
                                                importance=self.calibration.importance.get(module),
                                                search=precision.rounding != "nearest")
        return quantize_blocks(weight, precision.bits, precision.block_size,
                               importance=self.calibration.importance.get(module),
                               search_clipping=precision.rounding != "nearest")

    def _record(self, name: str, weight: np.ndarray, precision: WeightPrecision,
                blocks: BlockQuantized | None) -> None:
        if blocks is None:
            self.report.append(TensorReport(name, tuple(weight.shape), "fp32", weight.nbytes, 0.0))
            return
        error = float(np.sqrt(np.mean((dequantize_blocks(blocks) - weight) ** 2)))
        self.report.append(TensorReport(name, tuple(weight.shape), precision.describe(), blocks.nbytes, error))

    def _linear(self, x: str, weight: np.ndarray, precision: WeightPrecision, name: str, module: str) -> str:
        """x @ weight.T, weight (out, in), as a float MatMul or a MatMulNBits."""
        graph = self.graph
        if precision.bits is None:
            self._record(name, weight, precision, None)
            return graph.op1("MatMul", [x, graph.weight(f"{name}.weight", weight.T)], name)
        blocks = self._quantize(weight, precision, module)
        self._record(name, weight, precision, blocks)
        return self._matmul_nbits(x, blocks, weight.shape, name)

    def _matmul_nbits(self, x: str, blocks: BlockQuantized, shape: tuple[int, int], name: str,
                      weight_names: tuple[str, str, str] | None = None) -> str:
        graph = self.graph
        if weight_names is None:
            weight_names = (graph.weight(f"{name}.qweight", blocks.packed), graph.weight(f"{name}.scales",
                                                                                        blocks.scales),
                            graph.weight(f"{name}.zero_points", blocks.zero_points))
        product = graph.op1("MatMulNBits", [x, *weight_names], name, domain="com.microsoft", K=shape[1],
                            N=shape[0], bits=blocks.bits, block_size=blocks.block_size,
                            accuracy_level=self.plan.accuracy_level)
        if blocks.minimums is None:
            return product
        # each block's minimum times the sum of the inputs it multiplies: (batch, seq, blocks) @ (blocks, N)
        correction = graph.op1("MatMul", [self._block_sums(x, shape[1], blocks.block_size),
                                          graph.weight(f"{name}.minimums", blocks.minimums.T)], f"{name}.min")
        return graph.op1("Add", [product, correction], f"{name}.with_min")

    def _block_sums(self, x: str, columns: int, block_size: int) -> str:
        """Sums of x over each block of `block_size` columns, computed once per input."""
        key = (x, block_size)
        if key not in self._sums:
            graph = self.graph
            if columns % block_size:
                raise ValueError(f"{columns} columns are not whole blocks of {block_size}")
            shaped = graph.op1("Reshape", [x, graph.ints(f"{x}.blocks_shape", [0, 0, columns // block_size,
                                                                                  block_size])], f"{x}.blocks")
            self._sums[key] = graph.op1("ReduceSum", [shaped, graph.ints(f"{x}.last_axis", [-1])],
                                        f"{x}.block_sums", keepdims=0)
        return self._sums[key]

    def _grouped_linears(self, x: str, weights: dict[str, tuple[np.ndarray, str]], roles: tuple[str, ...],
                         name: str, split: bool = True) -> list[str]:
        """The projections of `roles` from the same input: one MatMul over their stacked rows where they share a
        precision (then split, unless `split` is False and the stacked output is what the caller takes), or one
        each."""
        precisions = {self.plan.for_role(role) for role in roles}
        if len(precisions) == 1:
            stacked = np.concatenate([weights[role][0] for role in roles], axis=0)
            fused = self._linear(x, stacked, precisions.pop(), f"{name}.{'_'.join(roles)}", weights[roles[0]][1])
            if len(roles) == 1 or not split:
                return [fused]
            sizes = [weights[role][0].shape[0] for role in roles]
            return self.graph.op("Split", [fused, self.graph.ints(f"{name}.split_sizes", sizes)],
                                 f"{name}.split", outputs=len(roles), axis=-1)
        return [self._linear(x, weights[role][0], self.plan.for_role(role), f"{name}.{role}", weights[role][1])
                for role in roles]

    # -- the graph ------------------------------------------------------------------------------

    def _embedding(self, input_ids: str) -> str:
        graph, spec, precision = self.graph, self.spec, self.plan.embedding
        table = self._read("model.embed_tokens.weight")
        if precision.bits is None:
            self._record("embed_tokens", table, precision, None)
            embedded = graph.op1("Gather", [graph.weight("embed_tokens.weight", table), input_ids], "embed_tokens")
        else:
            shared = (spec.tied_embeddings and self.plan.head == precision)
            blocks = self._quantize(table, precision, "lm_head" if shared else "")
            self._record("embed_tokens", table, precision, blocks)
            if shared:
                self._head_blocks = blocks
            names = [graph.weight("embed_tokens.qweight", blocks.packed.reshape(blocks.packed.shape[0], -1)),
                     input_ids, graph.weight("embed_tokens.scales", blocks.scales),
                     graph.weight("embed_tokens.zero_points", blocks.zero_points)]
            embedded = graph.op1("GatherBlockQuantized", names, "embed_tokens", domain="com.microsoft",
                                 bits=blocks.bits, block_size=blocks.block_size, gather_axis=0, quantize_axis=1)
        if spec.embedding_scale is not None:
            # transformers rounds the scale to the weights' dtype before multiplying
            scale = np.asarray(spec.embedding_scale, dtype=np.float32)
            embedded = graph.op1("Mul", [embedded, graph.weight("embed_scale", scale)], "embed_scale")
        return embedded

    def _head(self, hidden: str, input_ids: str) -> str:
        graph, spec, precision = self.graph, self.spec, self.plan.head
        if self._head_blocks is not None:  # the embedding's blocks, viewed as MatMulNBits' (N, blocks, blob)
            blocks = self._head_blocks
            view = graph.op1("Reshape", ["embed_tokens.qweight",
                                         graph.ints("head_blob_shape", list(blocks.packed.shape))], "head_blocks")
            names = (view, "embed_tokens.scales", "embed_tokens.zero_points")
            logits = self._matmul_nbits(hidden, blocks, (spec.vocab, spec.hidden), "lm_head", names)
            self.report.append(TensorReport("lm_head (shares embed_tokens)", (spec.vocab, spec.hidden),
                                            precision.describe(), 0, self.report[0].rms_error))
        elif spec.tied_embeddings and precision.bits is None and self.plan.embedding.bits is None:
            # Gemm with transB reads the embedding table as it is stored: no second float32 copy in the file
            flat = graph.op1("Reshape", [hidden, graph.ints("hidden_2d", [-1, spec.hidden])], "head_flatten")
            flat_logits = graph.op1("Gemm", [flat, "embed_tokens.weight"], "lm_head", transB=1)
            out_shape = graph.op1("Concat", [graph.op1("Shape", [input_ids], "ids_shape"),
                                             graph.ints("vocab_dim", [spec.vocab])], "logits_shape", axis=0)
            logits = graph.op1("Reshape", [flat_logits, out_shape], "logits_3d")
            self.report.append(TensorReport("lm_head (shares embed_tokens)", (spec.vocab, spec.hidden), "fp32", 0,
                                            0.0))
        else:
            name = "model.embed_tokens.weight" if spec.tied_embeddings else "lm_head.weight"
            logits = self._linear(hidden, self._read(name), precision, "lm_head", "lm_head")
        if spec.final_softcap:
            cap = graph.weight("final_softcap", np.asarray(spec.final_softcap, dtype=np.float32))
            logits = graph.op1("Mul", [graph.op1("Tanh", [graph.op1("Div", [logits, cap], "softcap_div")],
                                                 "softcap_tanh"), cap], "softcap_mul")
        return logits

    def _rms_norm(self, x: str, weight: str, name: str) -> str:
        return self.graph.op1("SimplifiedLayerNormalization", [x, weight], name, axis=-1,
                              epsilon=self.spec.norm_eps, stash_type=1)

    def _skip_rms_norm(self, x: str, residual: str, weight: str, name: str) -> tuple[str, str]:
        """RMSNorm(x + residual) and x + residual."""
        outputs = self.graph.op("SkipSimplifiedLayerNormalization", [x, residual, weight], name, outputs=4,
                                domain="com.microsoft", epsilon=self.spec.norm_eps)
        return outputs[0], outputs[3]

    def _head_norm(self, x: str, hf_weight: str, heads: int, name: str) -> str:
        """RMSNorm over each head of a (batch, sequence, heads * head_dim) projection."""
        graph, spec = self.graph, self.spec
        split = graph.op1("Reshape", [x, graph.ints(f"{name}.heads_shape", [0, 0, heads, spec.head_dim])],
                          f"{name}.split_heads")
        normed = self._rms_norm(split, self._norm_weight(hf_weight, f"{name}.weight"), name)
        return graph.op1("Reshape", [normed, graph.ints(f"{name}.flat_shape", [0, 0, heads * spec.head_dim])],
                         f"{name}.merge_heads")

    def _attention(self, layer: int, x: str, weights: dict, lengths: tuple[str, str]) -> str:
        graph, spec = self.graph, self.spec
        name = f"layers.{layer}.attn"
        attn = f"model.layers.{layer}.self_attn"
        if spec.qkv_bias or spec.qk_norm:  # q and k need work between the projection and attention
            q, k, v = self._grouped_linears(x, weights, ("q", "k", "v"), name)
            if spec.qkv_bias:
                q, k, v = (graph.op1("Add", [t, graph.weight(f"{name}.{role}.bias",
                                                             self._read(f"{attn}.{role}_proj.bias"))],
                                     f"{name}.{role}_bias") for t, role in ((q, "q"), (k, "k"), (v, "v")))
            if spec.qk_norm:
                q = self._head_norm(q, f"{attn}.q_norm.weight", spec.heads, f"{name}.q_norm")
                k = self._head_norm(k, f"{attn}.k_norm.weight", spec.kv_heads, f"{name}.k_norm")
            qkv_inputs = [q, k, v]
        else:
            parts = self._grouped_linears(x, weights, ("q", "k", "v"), name, split=False)
            if len(parts) == 1:  # packed: GroupQueryAttention splits it itself
                qkv_inputs = [parts[0], "", ""]
            else:
                qkv_inputs = parts
        table = spec.layer_rotary[layer]
        attributes = {"num_heads": spec.heads, "kv_num_heads": spec.kv_heads, "do_rotary": 1,
                      "rotary_interleaved": 0}
        if spec.attention_scale is not None:
            attributes["scale"] = float(spec.attention_scale)
        if spec.attention_softcap:
            attributes["softcap"] = float(spec.attention_softcap)
        if spec.layer_windows[layer] is not None:
            attributes["local_window_size"] = int(spec.layer_windows[layer])  # as transformers counts it
        inputs = [*qkv_inputs, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", *lengths,
                  f"rotary.{table}.cos", f"rotary.{table}.sin"]
        outputs = [f"{name}/out", f"present.{layer}.key", f"present.{layer}.value"]
        graph.nodes.append(helper.make_node("GroupQueryAttention", inputs, outputs, name=name,
                                            domain="com.microsoft", **attributes))
        return self._linear(outputs[0], weights["o"][0], self.plan.for_role("o"), f"{name}.o", weights["o"][1])

    def _mlp(self, layer: int, x: str, weights: dict) -> str:
        graph = self.graph
        name = f"layers.{layer}.mlp"
        gate, up = self._grouped_linears(x, weights, ("gate", "up"), name)
        if self.spec.activation == "silu":
            active = graph.op1("QuickGelu", [gate], f"{name}.act", domain="com.microsoft", alpha=1.0)
        else:
            active = graph.op1("FastGelu", [gate], f"{name}.act", domain="com.microsoft")
        product = graph.op1("Mul", [active, up], f"{name}.gated")
        return self._linear(product, weights["down"][0], self.plan.for_role("down"), f"{name}.down",
                            weights["down"][1])

    def _lengths(self) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (tokens held - 1, per sequence) and total_sequence_length, from the
        attention mask, as onnxruntime-genai feeds them."""
        graph = self.graph
        held = graph.op1("ReduceSum", ["attention_mask", graph.ints("axis_1", [1])], "mask_sum", keepdims=0)
        last = graph.op1("Sub", [held, graph.ints("one", [1])], "mask_last")
        seqlens_k = graph.op1("Cast", [last], "seqlens_k", to=TensorProto.INT32)
        mask_shape = graph.op1("Shape", ["attention_mask"], "mask_shape")
        total = graph.op1("Gather", [mask_shape, graph.weight("index_1", np.asarray(1, dtype=np.int64))],
                          "mask_length", axis=0)
        return seqlens_k, graph.op1("Cast", [total], "total_sequence_length", to=TensorProto.INT32)

    def build(self) -> onnx.ModelProto:
        spec, graph = self.spec, self.graph
        for index, table in enumerate(spec.rotary):
            graph.weight(f"rotary.{index}.cos", table.cos)
            graph.weight(f"rotary.{index}.sin", table.sin)
        lengths = self._lengths()
        residual = self._embedding("input_ids")
        pending: str | None = None  # a block's output not yet added to the residual stream
        for layer in range(spec.layers):
            prefix = f"model.layers.{layer}"
            weights = self._layer_weights(layer)
            norm_in = self._norm_weight(f"{prefix}.input_layernorm.weight", f"layers.{layer}.input_norm")
            if pending is None:
                hidden = self._rms_norm(residual, norm_in, f"layers.{layer}.input_norm")
            else:
                hidden, residual = self._skip_rms_norm(pending, residual, norm_in, f"layers.{layer}.input_norm")
            attended = self._attention(layer, hidden, weights, lengths)
            if spec.sandwich_norms:
                attended = self._rms_norm(attended, self._norm_weight(
                    f"{prefix}.post_attention_layernorm.weight", f"layers.{layer}.post_attn_norm"),
                    f"layers.{layer}.post_attn_norm")
                pre_mlp = f"{prefix}.pre_feedforward_layernorm.weight"
            else:
                pre_mlp = f"{prefix}.post_attention_layernorm.weight"
            hidden, residual = self._skip_rms_norm(attended, residual, self._norm_weight(
                pre_mlp, f"layers.{layer}.pre_mlp_norm"), f"layers.{layer}.pre_mlp_norm")
            pending = self._mlp(layer, hidden, weights)
            if spec.sandwich_norms:
                pending = self._rms_norm(pending, self._norm_weight(
                    f"{prefix}.post_feedforward_layernorm.weight", f"layers.{layer}.post_mlp_norm"),
                    f"layers.{layer}.post_mlp_norm")
        final = self._norm_weight("model.norm.weight", "final_norm")
        hidden, _ = self._skip_rms_norm(pending, residual, final, "final_norm")
        logits = self._head(hidden, "input_ids")
        graph.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
        return self._model()

    def _model(self) -> onnx.ModelProto:
        spec = self.spec
        cache_shape = ["batch_size", spec.kv_heads, "past_sequence_length", spec.head_dim]
        present_shape = ["batch_size", spec.kv_heads, "total_sequence_length", spec.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch_size", "sequence_length", spec.vocab])]
        for layer in range(spec.layers):
            for part in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{part}", TensorProto.FLOAT,
                                                            cache_shape))
                outputs.append(helper.make_tensor_value_info(f"present.{layer}.{part}", TensorProto.FLOAT,
                                                             present_shape))
        graph = helper.make_graph(self.graph.nodes, "decoder", inputs, outputs, self.graph.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="edgepack")
        model.ir_version = 10
        helper.set_model_props(model, {GRAPH_METADATA_KEY: GRAPH_KIND, "edgepack.precision": self.plan.describe()})
        return model


def write_decoder_graph(model: HFModelDir, spec: DecoderSpec, plan: PrecisionPlan, out_file: Path,
                        calibration: CalibrationStats | None = None) -> list[TensorReport]:
    """Build the graph and save it to `out_file`, its weights in `out_file`.data beside it: ONNX Runtime maps an
    external data file instead of holding a parsed copy of the protobuf (the 8-bit demo student's resident
    memory after loading fell from 1.75x to 1.3x its file). Returns the per-tensor report."""
    builder = DecoderGraphBuilder(model, spec, plan, calibration)
    proto = builder.build()
    onnx.save_model(proto, str(out_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{out_file.name}.data", size_threshold=1024)
    return builder.report

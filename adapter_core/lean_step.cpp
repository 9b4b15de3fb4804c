// The decoder layers of adapter_core/lean_decoder.py's step, for its commonest case (every fused
// product 4-bit, no biases, no adapter or one user's folded LoRA pairs on o_proj and down_proj),
// as the same ATen operations called from C++: the arithmetic is the Python step's, operation
// for operation; what goes is Python's cost between them (~1 µs each, ~1,700 per token).
#include <torch/extension.h>

#include <vector>

using at::Tensor;

namespace {

Tensor int4_product(const Tensor& x, const Tensor& packed, int64_t group, const Tensor& scales) {
  return at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), packed, group, scales);  // (B, d_out) bf16
}

Tensor rotate(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  return x * cos + at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1) * sin;
}

}  // namespace

// h (B, D) is updated in place and returned: the hidden state after the last decoder layer.
// Per layer i: norms[2i], norms[2i+1]; products[8i..8i+7]: packed and scales of qkv, o, gate_up,
// down; keys[i], values[i] (B, H_kv, capacity, hd), column `width` written; loras[4i..4i+3]: o's
// lora_A^T, lora_B^T, down's lora_A^T, lora_B^T (empty: no adapter).
Tensor decoder_layers(Tensor h, const Tensor& cos, const Tensor& sin, const c10::optional<Tensor>& attend,
                      const std::vector<Tensor>& norms, double eps, const std::vector<Tensor>& products,
                      int64_t group, std::vector<Tensor> keys, std::vector<Tensor> values, int64_t width,
                      int64_t heads, int64_t kv_heads, int64_t head_dim, const std::vector<Tensor>& loras) {
  const int64_t b = h.size(0), d = h.size(1);
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  const bool adapted = !loras.empty();
  const std::vector<int64_t> shape{d};
  for (size_t i = 0; i < keys.size(); ++i) {
    Tensor x = at::rms_norm(h, shape, norms[2 * i], eps);
    Tensor qkv = int4_product(x, products[8 * i], group, products[8 * i + 1]).to(at::kFloat);
    Tensor qk = rotate(qkv.narrow(1, 0, q_size + kv_size).view({b, heads + kv_heads, 1, head_dim}), cos, sin);
    keys[i].select(2, width).copy_(qk.narrow(1, heads, kv_heads).select(2, 0));
    values[i].select(2, width).copy_(qkv.narrow(1, q_size + kv_size, kv_size).view({b, kv_heads, head_dim}));
    Tensor attention = at::scaled_dot_product_attention(
        qk.narrow(1, 0, heads), keys[i].narrow(2, 0, width + 1), values[i].narrow(2, 0, width + 1), attend,
        0.0, false, c10::nullopt, heads != kv_heads).reshape({b, q_size});
    h.add_(int4_product(attention, products[8 * i + 2], group, products[8 * i + 3]));
    if (adapted) h.addmm_(at::mm(attention, loras[4 * i]), loras[4 * i + 1]);
    x = at::rms_norm(h, shape, norms[2 * i + 1], eps);
    Tensor gate_up = int4_product(x, products[8 * i + 4], group, products[8 * i + 5]).to(at::kFloat);
    const int64_t inner = gate_up.size(1) / 2;
    Tensor z = at::silu(gate_up.narrow(1, 0, inner)) * gate_up.narrow(1, inner, inner);
    h.add_(int4_product(z, products[8 * i + 6], group, products[8 * i + 7]));
    if (adapted) h.addmm_(at::mm(z, loras[4 * i + 2]), loras[4 * i + 3]);
  }
  return h;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decoder_layers", &decoder_layers, "the lean decode step's decoder layers (adapter_core/lean_decoder.py)");
}

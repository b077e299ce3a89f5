// The op schemas of the mHC kernels under the `mhc_megatron` namespace, and the Python module
// mhc_megatron._C whose import registers them. CPU implementations: mhc_cpu_*.cpp, one library per
// instruction-set level, chosen at run time by cpu_dispatch.cpp (which also defines the ops
// cpu_isa, set_cpu_isa, cpu_isa_levels); CUDA: mhc_cuda.cu; autograd and fake (meta)
// implementations: mhc_megatron/ops/fused.py.
//
// Shapes: T tokens, n streams, C hidden, K = n*n + 2n mapping columns; coefficients (h_*, phi,
// alpha, bias, saved) in float32, float64 for float64 streams. `saved` is [T, K + 1]: the
// normalised projection u = (v @ phi) / r and, last, 1/r.
//
// mappings_pre is mappings followed by pre (layer_input = h_pre x) in one op, reading the streams
// once in forward; its backward writes the whole stream gradient of both ops at once, plus
// `grad_x` when given (the gradient that reaches x from elsewhere, e.g. post_res).
//
// post_res_mappings_pre is post_res followed by mappings_pre on its output (the stream state between
// two sub-layers: this one's post_res, the next one's mappings and input), in one op: the streams it
// writes are read from the cache in forward; in backward the gradient of `streams` (mappings_pre's,
// plus `grad_streams` when given) goes straight into post_res's backward and is never written.
// CPU kernels only (mhc_cpu_mappings.cpp).
//
// hc_mappings_pre is the same for HC's mappings (mhc_megatron/ops/hc_mappings_pre.py): weight
// [C, n + 2], alpha [3], static_pre [n], static_post [n], static_res [n, n]; `saved` is [T, n, n + 3]:
// per stream the normalised projection u = (x_i @ weight) / r_i and, last, 1/r_i. CPU kernels only
// (mhc_cpu_hc.cpp).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mhc_megatron, m) {
  m.def("sinkhorn_fwd(Tensor logits, int iters) -> Tensor");
  m.def("sinkhorn_bwd(Tensor logits, Tensor grad_out, int iters) -> Tensor");
  m.def(
      "mappings_fwd(Tensor x, Tensor phi, Tensor alpha, Tensor bias, int iters, float eps)"
      " -> (Tensor h_pre, Tensor h_post, Tensor h_res, Tensor saved)");
  m.def(
      "mappings_bwd(Tensor grad_pre, Tensor grad_post, Tensor grad_res, Tensor x, Tensor phi,"
      " Tensor alpha, Tensor bias, Tensor saved, int iters)"
      " -> (Tensor grad_x, Tensor grad_phi, Tensor grad_alpha, Tensor grad_bias)");
  m.def(
      "mappings_pre_fwd(Tensor x, Tensor phi, Tensor alpha, Tensor bias, int iters, float eps)"
      " -> (Tensor layer_input, Tensor h_pre, Tensor h_post, Tensor h_res, Tensor saved)");
  m.def(
      "mappings_pre_bwd(Tensor grad_input, Tensor grad_pre, Tensor grad_post, Tensor grad_res, Tensor? grad_x,"
      " Tensor x, Tensor phi, Tensor alpha, Tensor bias, Tensor h_pre, Tensor saved, int iters)"
      " -> (Tensor grad_x, Tensor grad_phi, Tensor grad_alpha, Tensor grad_bias)");
  m.def("pre_fwd(Tensor x, Tensor h_pre) -> Tensor");
  m.def("pre_bwd(Tensor grad_out, Tensor x, Tensor h_pre) -> (Tensor grad_x, Tensor grad_h_pre)");
  m.def("post_res_fwd(Tensor x, Tensor f, Tensor h_post, Tensor h_res) -> Tensor");
  m.def(
      "post_res_bwd(Tensor grad_out, Tensor x, Tensor f, Tensor h_post, Tensor h_res)"
      " -> (Tensor grad_x, Tensor grad_f, Tensor grad_h_post, Tensor grad_h_res)");
  m.def(
      "hc_mappings_pre_fwd(Tensor x, Tensor weight, Tensor alpha, Tensor static_pre, Tensor static_post,"
      " Tensor static_res, float eps)"
      " -> (Tensor layer_input, Tensor h_pre, Tensor h_post, Tensor h_res, Tensor saved)");
  m.def(
      "hc_mappings_pre_bwd(Tensor grad_input, Tensor grad_pre, Tensor grad_post, Tensor grad_res, Tensor? grad_x,"
      " Tensor x, Tensor weight, Tensor alpha, Tensor h_pre, Tensor saved)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_alpha, Tensor grad_static_pre, Tensor grad_static_post,"
      " Tensor grad_static_res)");
  m.def(
      "post_res_mappings_pre_fwd(Tensor x, Tensor f, Tensor h_post, Tensor h_res, Tensor phi, Tensor alpha,"
      " Tensor bias, int iters, float eps)"
      " -> (Tensor streams, Tensor layer_input, Tensor next_h_pre, Tensor next_h_post, Tensor next_h_res,"
      " Tensor saved)");
  m.def(
      "post_res_mappings_pre_bwd(Tensor grad_input, Tensor grad_pre, Tensor grad_post, Tensor grad_res,"
      " Tensor? grad_streams, Tensor x, Tensor f, Tensor h_post, Tensor h_res, Tensor streams, Tensor phi,"
      " Tensor alpha, Tensor bias, Tensor next_h_pre, Tensor saved, int iters)"
      " -> (Tensor grad_x, Tensor grad_f, Tensor grad_h_post, Tensor grad_h_res, Tensor grad_phi, Tensor grad_alpha,"
      " Tensor grad_bias)");
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mHC fused kernels (torch.ops.mhc_megatron)",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef MHC_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

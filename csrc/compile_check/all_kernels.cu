// Compile check for the CUDA kernels with nvcc alone (no torch include path): the build's own
// nvcc translation units in one, so their launchers emit every template instantiation the
// dispatch switches can reach (each dtype x head_dim for attention, each dtype for sampling and
// contrastive, each copy width for append_kv), and any torch header they reached would fail to
// compile here. tools/compile_check.py builds this file for every target architecture with
// warnings as errors and checks the resulting kernels.
#include "../cuda/attention_kernels.cu"
#include "../cuda/contrastive_kernels.cu"
#include "../cuda/sampling_kernels.cu"

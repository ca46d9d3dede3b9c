// The prebuilt extension module `actpass._C` (setup.py with ACTPASS_BUILD_EXT=1). It exposes nothing to Python:
// importing it loads the shared library, whose static TORCH_LIBRARY_IMPL blocks register the CPU (and CUDA) kernels
// of the actpass ops with the dispatcher. The JIT build (actpass/_extension.py) does not compile this file.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "actpass compiled kernels (registered with the PyTorch dispatcher on import)",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}

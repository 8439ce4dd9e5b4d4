// Python entry point of frontiers_fast._C.  The module itself is empty: the
// kernels register themselves with the dispatcher (TORCH_LIBRARY_IMPL) when
// the shared library is loaded, and the schemas are defined from Python
// (frontiers_fast/ops/*.py) so that the ops exist even without this library.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

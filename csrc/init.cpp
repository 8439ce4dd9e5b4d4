// Python entry point of frontiers_fast._C.  The kernels register themselves
// with the dispatcher (TORCH_LIBRARY_IMPL under frontiers_fast_native) when the
// shared library is loaded; the schemas are defined from Python
// (frontiers_fast/_library.py), so the ops exist even without this library.
// The module holds one attribute, with_cuda: whether the CUDA kernels were
// built in, which frontiers_fast.backends() reports.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef FRONTIERS_FAST_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(m, "with_cuda", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

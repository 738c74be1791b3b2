//go:build unix

package pkcs11safe

/*
#cgo linux LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

// why_unloadable loads path again to learn why github.com/miekg/pkcs11
// could not (it reports only failure). NULL means it now loads and has
// C_GetFunctionList.
static const char *why_unloadable(const char *path) {
	void *h = dlopen(path, RTLD_LAZY | RTLD_LOCAL);
	if (h == NULL) {
		return dlerror();
	}
	void *sym = dlsym(h, "C_GetFunctionList");
	dlclose(h);
	return sym == NULL ? "the library has no C_GetFunctionList symbol" : NULL;
}
*/
import "C"

import "unsafe"

// loadError explains why the library at path does not load, or returns ""
// if it does now.
func loadError(path string) string {
	p := C.CString(path)
	defer C.free(unsafe.Pointer(p))
	if msg := C.why_unloadable(p); msg != nil {
		return C.GoString(msg)
	}
	return ""
}

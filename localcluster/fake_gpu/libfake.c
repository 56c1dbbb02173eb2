/* Stands in for a GPU driver library (fake_gpu tests): reports its own version and file. */
#define _GNU_SOURCE
#include <dlfcn.h>

#ifndef FAKE_VERSION
#error FAKE_VERSION must be defined
#endif

const char *fake_driver_version(void) { return FAKE_VERSION; }

const char *fake_driver_file(void) {
    Dl_info info;
    if (dladdr((void *)fake_driver_version, &info) && info.dli_fname)
        return info.dli_fname;
    return "?";
}

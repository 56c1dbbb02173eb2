/* The image's "CUDA program" (fake_gpu tests): loads libcuda.so.1 the way the CUDA runtime
 * does (dlopen by soname) and says which file it got, so a test sees whether the image's stub
 * or the host driver's library won. */
#include <dlfcn.h>
#include <stdio.h>

int main(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) {
        printf("libcuda: %s\n", dlerror());
        return 1;
    }
    const char *(*version)(void) = (const char *(*)(void))dlsym(lib, "fake_driver_version");
    const char *(*file)(void) = (const char *(*)(void))dlsym(lib, "fake_driver_file");
    if (!version || !file) {
        printf("libcuda: not the fake driver\n");
        return 1;
    }
    printf("libcuda %s from %s\n", version(), file());
    return 0;
}

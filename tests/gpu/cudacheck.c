/* A CUDA driver-API check with no CUDA headers or toolkit: libcuda.so.1 is loaded as the CUDA
 * runtime loads it, a kernel is JIT-compiled from PTX by the driver, run, and its result checked.
 * Prints: "device <name>", "driver <version>", "kernel ok <n>", and the times in milliseconds. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUmodule;
typedef void *CUfunction;
typedef unsigned long long CUdeviceptr;

static const char PTX[] =
    ".version 7.0\n"
    ".target sm_52\n"
    ".address_size 64\n"
    ".visible .entry add_index(.param .u64 data, .param .u32 n)\n"
    "{\n"
    "  .reg .pred p;\n"
    "  .reg .b32 r<8>;\n"
    "  .reg .b64 rd<5>;\n"
    "  ld.param.u64 rd1, [data];\n"
    "  ld.param.u32 r1, [n];\n"
    "  mov.u32 r2, %ctaid.x;\n"
    "  mov.u32 r3, %ntid.x;\n"
    "  mov.u32 r4, %tid.x;\n"
    "  mad.lo.s32 r5, r2, r3, r4;\n"
    "  setp.ge.u32 p, r5, r1;\n"
    "  @p bra DONE;\n"
    "  cvta.to.global.u64 rd2, rd1;\n"
    "  mul.wide.u32 rd3, r5, 4;\n"
    "  add.s64 rd4, rd2, rd3;\n"
    "  ld.global.u32 r6, [rd4];\n"
    "  add.s32 r7, r6, r5;\n"
    "  st.global.u32 [rd4], r7;\n"
    "DONE:\n"
    "  ret;\n"
    "}\n";

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void *sym(void *lib, const char *name) {
    void *f = dlsym(lib, name);
    if (!f) {
        printf("error: libcuda lacks %s\n", name);
        exit(2);
    }
    return f;
}

#define CHECK(call)                                                 \
    do {                                                            \
        CUresult rc_ = (call);                                      \
        if (rc_ != 0) {                                             \
            printf("error: %s returned %d\n", #call, rc_);          \
            return 3;                                               \
        }                                                           \
    } while (0)

int main(void) {
    double start = now_ms();
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) {
        printf("error: %s\n", dlerror());
        return 1;
    }
    CUresult (*cuInit)(unsigned) = sym(lib, "cuInit");
    CUresult (*cuDriverGetVersion)(int *) = sym(lib, "cuDriverGetVersion");
    CUresult (*cuDeviceGetCount)(int *) = sym(lib, "cuDeviceGetCount");
    CUresult (*cuDeviceGet)(CUdevice *, int) = sym(lib, "cuDeviceGet");
    CUresult (*cuDeviceGetName)(char *, int, CUdevice) = sym(lib, "cuDeviceGetName");
    CUresult (*cuCtxCreate)(CUcontext *, unsigned, CUdevice) = sym(lib, "cuCtxCreate_v2");
    CUresult (*cuCtxDestroy)(CUcontext) = sym(lib, "cuCtxDestroy_v2");
    CUresult (*cuModuleLoadData)(CUmodule *, const void *) = sym(lib, "cuModuleLoadData");
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *) = sym(lib, "cuModuleGetFunction");
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = sym(lib, "cuMemAlloc_v2");
    CUresult (*cuMemFree)(CUdeviceptr) = sym(lib, "cuMemFree_v2");
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t) = sym(lib, "cuMemcpyHtoD_v2");
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t) = sym(lib, "cuMemcpyDtoH_v2");
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               void *, void **, void **) = sym(lib, "cuLaunchKernel");
    CUresult (*cuCtxSynchronize)(void) = sym(lib, "cuCtxSynchronize");

    double t0 = now_ms();
    CHECK(cuInit(0));
    double init_ms = now_ms() - t0;
    int version = 0, count = 0;
    CHECK(cuDriverGetVersion(&version));
    CHECK(cuDeviceGetCount(&count));
    if (count < 1) {
        printf("error: no device\n");
        return 4;
    }
    CUdevice dev;
    char name[256] = {0};
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDeviceGetName(name, sizeof name - 1, dev));
    printf("devices %d\n", count);
    printf("device %s\n", name);
    printf("driver %d.%d\n", version / 1000, (version % 1000) / 10);

    CUcontext ctx;
    CHECK(cuCtxCreate(&ctx, 0, dev));
    t0 = now_ms();
    CUmodule mod;
    CHECK(cuModuleLoadData(&mod, PTX));
    double jit_ms = now_ms() - t0;
    CUfunction fn;
    CHECK(cuModuleGetFunction(&fn, mod, "add_index"));
    enum { N = 1 << 20 };
    unsigned *host = malloc(N * sizeof *host);
    for (unsigned i = 0; i < N; i++) host[i] = 7;
    CUdeviceptr buf;
    CHECK(cuMemAlloc(&buf, N * sizeof *host));
    CHECK(cuMemcpyHtoD(buf, host, N * sizeof *host));
    unsigned n = N;
    void *params[] = {&buf, &n};
    CHECK(cuLaunchKernel(fn, (N + 255) / 256, 1, 1, 256, 1, 1, 0, NULL, params, NULL));
    CHECK(cuCtxSynchronize());
    CHECK(cuMemcpyDtoH(host, buf, N * sizeof *host));
    unsigned bad = 0;
    for (unsigned i = 0; i < N; i++)
        if (host[i] != 7 + i) bad++;
    CHECK(cuMemFree(buf));
    CHECK(cuCtxDestroy(ctx));
    if (bad) {
        printf("kernel wrong %u of %u\n", bad, (unsigned)N);
        return 5;
    }
    printf("kernel ok %u\n", (unsigned)N);
    printf("times cuInit_ms=%.1f jit_ms=%.1f total_ms=%.1f\n", init_ms, jit_ms, now_ms() - start);
    free(host);
    return 0;
}

/* Threads for the kernels' loops over segments.
 *
 * Built with -fopenmp, the libraries need "libgomp.so.1", which inside a Python process that has
 * imported torch is torch's own copy (same soname, already loaded), so the kernels run on torch's
 * OpenMP thread team: no extra threads competing for the cores with torch's spinning workers.
 * Built without OpenMP, bt_openmp() returns 0 and the caller splits the segments over threads.
 */
#ifndef BT_PARALLEL_H
#define BT_PARALLEL_H

#ifdef _OPENMP
#define BT_PRAGMA(x) _Pragma(#x)
#define PARALLEL_FOR(n) BT_PRAGMA(omp parallel for schedule(dynamic, 1) num_threads(n) if(n > 1))
int bt_openmp(void) { return 1; }
#else
#define PARALLEL_FOR(n)
int bt_openmp(void) { return 0; }
#endif

#endif

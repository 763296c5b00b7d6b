// Package supervise keeps one local child process running until a context
// ends. The coordinator uses it to run its local workers (--local-workers):
// the coordinator binary itself, started again in worker mode.
//
// The model:
//
//   - Run starts the child and waits for it. A child that exits with status
//     0 on its own has finished its work (a worker drained by its
//     coordinator): Run returns without starting another. When the child
//     exits otherwise (a non-zero status, a signal), Run waits a backoff and
//     starts it again.
//     The backoff starts at Config.MinBackoff and doubles after each exit up
//     to Config.MaxBackoff; a child that ran for Config.ResetAfter or longer
//     was healthy, and the next wait is MinBackoff again. A child that
//     cannot be started at all (no such executable) is retried the same way.
//   - When the context ends, Run sends the running child Config.StopSignal
//     (default SIGTERM), gives it
//     Config.StopGrace to exit, then sends SIGKILL. Run returns only once
//     the child has been waited for: it leaves no process and no goroutine
//     behind.
//   - On Linux the child is started with Pdeathsig SIGKILL, so it dies with
//     its parent even when the parent is killed (SIGKILL, a crash) and never
//     runs the stop above. Other systems have no such attribute: there a
//     killed parent leaves its children running, and a qwenfleet worker then
//     exits on its own when its etcd lease expires or its own context ends.
//     (Linux sends the signal when the OS thread that started the child
//     exits; the Go runtime only ends threads locked with
//     runtime.LockOSThread, and Run does not lock its thread.)
//
// The child's environment, arguments and output are the caller's choice
// (Config); the package knows nothing of workers.
package supervise

//go:build unix

package supervise

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// childEnv, when set, makes the test binary a tiny child instead of running
// the tests:
//
//	exit:   exits with status 3 at once
//	serve:  prints "ready", waits for SIGTERM, prints "sigterm", exits 0
//	ignore: ignores SIGTERM, prints "ready", runs until killed
//	done:   exits with status 0 at once
//	int:    prints "ready", waits for SIGINT, prints "sigint", exits 0
const childEnv = "SUPERVISE_TEST_CHILD"

func TestMain(m *testing.M) {
	switch os.Getenv(childEnv) {
	case "":
		os.Exit(m.Run())
	case "exit":
		os.Exit(3)
	case "serve":
		term := make(chan os.Signal, 1)
		signal.Notify(term, syscall.SIGTERM)
		fmt.Println("ready")
		<-term
		fmt.Println("sigterm")
		os.Exit(0)
	case "done":
		os.Exit(0)
	case "int":
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT)
		fmt.Println("ready")
		<-sig
		fmt.Println("sigint")
		os.Exit(0)
	case "ignore":
		signal.Ignore(syscall.SIGTERM)
		fmt.Println("ready")
		time.Sleep(time.Hour) // (select{} would be a deadlock the runtime ends)
	}
	os.Exit(99)
}

const deadline = 20 * time.Second

type event struct {
	start bool // false: exit
	pid   int
	err   error
}

// harness runs Run on the test binary in one child mode.
type harness struct {
	t          *testing.T
	cfg        Config
	events     chan event
	cancel     context.CancelFunc
	ret        chan error    // Run's result, once
	done       chan struct{} // closed when Run returned
	lines      chan string   // the child's stdout, when piped
	readerDone chan struct{}
	pw         *os.File
	goroutines int
}

func start(t *testing.T, mode string, piped bool, tweak func(*Config)) *harness {
	h := &harness{t: t, events: make(chan event, 1000), ret: make(chan error, 1), done: make(chan struct{}), goroutines: runtime.NumGoroutine()}
	h.cfg = Config{
		Name:       "test child",
		Executable: os.Args[0],
		Env:        append(os.Environ(), childEnv+"="+mode),
		MinBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond,
		StopGrace: 10 * time.Second,
		OnStart:   func(pid int) { h.events <- event{start: true, pid: pid} },
		OnExit:    func(pid int, err error) { h.events <- event{pid: pid, err: err} },
	}
	if piped {
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		h.pw, h.cfg.Stdout = pw, pw
		h.lines, h.readerDone = make(chan string, 100), make(chan struct{})
		go func() {
			defer close(h.readerDone)
			defer pr.Close()
			sc := bufio.NewScanner(pr)
			for sc.Scan() {
				h.lines <- sc.Text()
			}
		}()
	}
	if tweak != nil {
		tweak(&h.cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.ret <- Run(ctx, h.cfg, nil); close(h.done) }()
	t.Cleanup(func() { // after a failed test: do not leave Run running
		cancel()
		select {
		case <-h.done:
		case <-time.After(deadline):
			t.Error("Run did not return")
		}
	})
	return h
}

func (h *harness) event() event {
	h.t.Helper()
	select {
	case e := <-h.events:
		return e
	case <-time.After(deadline):
		h.t.Fatal("no child event")
	}
	return event{}
}

func (h *harness) line(want string) {
	h.t.Helper()
	select {
	case l := <-h.lines:
		if l != want {
			h.t.Fatalf("child printed %q, want %q", l, want)
		}
	case <-time.After(deadline):
		h.t.Fatalf("child did not print %q", want)
	}
}

// stop cancels Run, waits for it and checks that nothing is left: no child
// process (every pid in pids is gone) and no goroutine beyond those the
// test had before starting Run.
func (h *harness) stop(pids ...int) {
	h.t.Helper()
	h.cancel()
	select {
	case err := <-h.ret:
		if err != nil {
			h.t.Fatalf("Run: %v", err)
		}
	case <-time.After(deadline):
		h.t.Fatal("Run did not return after cancel")
	}
	for _, pid := range pids {
		// Run has waited for the child, so the pid is reaped and gone.
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			h.t.Errorf("child %d still exists after Run returned (kill 0: %v)", pid, err)
		}
	}
	if h.pw != nil {
		h.pw.Close() // the child's copy closed when it exited: EOF for the reader
		select {
		case <-h.readerDone:
		case <-time.After(deadline):
			h.t.Fatal("the child's stdout stayed open after Run returned")
		}
	}
	// Goroutines that have sent their last value may not have exited yet:
	// wait (with a deadline) for the count to come back down.
	end := time.Now().Add(deadline)
	for runtime.NumGoroutine() > h.goroutines {
		if time.Now().After(end) {
			buf := make([]byte, 1<<20)
			h.t.Fatalf("%d goroutines after Run returned, %d before:\n%s", runtime.NumGoroutine(), h.goroutines, buf[:runtime.Stack(buf, true)])
		}
		runtime.Gosched()
	}
}

func exitStatus(err error) (code int, sig syscall.Signal) {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return -1, 0
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		return -1, ws.Signal()
	}
	return ws.ExitStatus(), 0
}

// A child that exits is started again, each time as a new process.
func TestRestartsAfterExit(t *testing.T) {
	h := start(t, "exit", false, nil)
	var pids []int
	seen := map[int]bool{}
	for len(pids) < 3 {
		e := h.event()
		if !e.start {
			if !seen[e.pid] {
				t.Fatalf("exit of %d before its start", e.pid)
			}
			if code, _ := exitStatus(e.err); code != 3 {
				t.Fatalf("child %d: %v, want exit status 3", e.pid, e.err)
			}
			continue
		}
		if seen[e.pid] {
			t.Fatalf("pid %d started twice", e.pid)
		}
		seen[e.pid] = true
		pids = append(pids, e.pid)
	}
	h.stop(pids...)
}

// On cancel the child gets SIGTERM, exits, and Run returns; it is not
// restarted.
func TestStopSendsSIGTERM(t *testing.T) {
	h := start(t, "serve", true, nil)
	e := h.event()
	if !e.start {
		t.Fatalf("first event: %+v", e)
	}
	h.line("ready") // its SIGTERM handler is in place
	h.cancel()
	h.line("sigterm")
	x := h.event()
	if x.start || x.pid != e.pid || x.err != nil {
		t.Fatalf("after cancel: %+v, want child %d's exit with status 0", x, e.pid)
	}
	h.stop(e.pid)
	select {
	case e := <-h.events:
		t.Fatalf("event after stop: %+v", e)
	default:
	}
}

// A child that exits 0 on its own is done: it is not started again, and
// Run returns.
func TestExitZeroIsNotRestarted(t *testing.T) {
	h := start(t, "done", false, nil)
	e := h.event()
	if x := h.event(); !e.start || x.start || x.pid != e.pid || x.err != nil {
		t.Fatalf("events %+v, %+v: want child %d's start and exit 0", e, x, e.pid)
	}
	select {
	case err := <-h.ret:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(deadline):
		t.Fatal("Run did not return after the child exited 0")
	}
	select {
	case e := <-h.events:
		t.Fatalf("event after the child finished: %+v", e)
	default:
	}
}

// StopSignal replaces SIGTERM.
func TestStopSignal(t *testing.T) {
	h := start(t, "int", true, func(c *Config) { c.StopSignal = syscall.SIGINT })
	e := h.event()
	h.line("ready")
	h.cancel()
	h.line("sigint")
	if x := h.event(); x.start || x.pid != e.pid || x.err != nil {
		t.Fatalf("after cancel: %+v, want child %d's exit with status 0", x, e.pid)
	}
	h.stop(e.pid)
}

// A child that ignores SIGTERM is killed after StopGrace.
func TestStopKillsAfterGrace(t *testing.T) {
	h := start(t, "ignore", true, func(c *Config) { c.StopGrace = 50 * time.Millisecond })
	e := h.event()
	h.line("ready") // SIGTERM is ignored from here on
	h.cancel()
	x := h.event()
	if _, sig := exitStatus(x.err); x.start || x.pid != e.pid || sig != syscall.SIGKILL {
		t.Fatalf("after cancel: child %d start=%v err=%v, want child %d killed by SIGKILL", x.pid, x.start, x.err, e.pid)
	}
	h.stop(e.pid)
}

// A program that cannot start is retried until ctx ends, and Run returns.
func TestCannotStart(t *testing.T) {
	if err := Run(context.Background(), Config{}, nil); err == nil {
		t.Fatal("Run with no executable: no error")
	}
	h := start(t, "exit", false, func(c *Config) {
		c.Executable = "/nonexistent/qwenfleet-supervise-test"
		c.OnStart = func(pid int) { t.Errorf("started %d", pid) }
	})
	h.stop()
}

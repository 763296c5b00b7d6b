package supervise

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// Config is what to run and how to restart and stop it. Zero durations take
// the defaults.
type Config struct {
	// Name labels the child in log lines (e.g. "worker 0").
	Name string
	// Executable is the path of the program to run (required).
	Executable string
	// Args are the child's arguments, without the program name.
	Args []string
	// Env is the child's whole environment, as KEY=value lines; nil gives
	// it the parent's (os.Environ()).
	Env []string
	// Stdout and Stderr receive the child's output; nil means the parent's
	// os.Stderr for both. A writer that is not an *os.File is fed by a
	// goroutine of os/exec that ends when the child (and whatever inherited
	// its output) closes it.
	Stdout, Stderr io.Writer
	// MinBackoff is the wait before a restart after a healthy run, and the
	// first one (default 1s); each exit doubles it up to MaxBackoff
	// (default 30s).
	MinBackoff, MaxBackoff time.Duration
	// ResetAfter: a child that ran at least this long counts as healthy and
	// the next wait is MinBackoff again (default 1 minute).
	ResetAfter time.Duration
	// StopSignal asks the child to stop when the context ends (default
	// SIGTERM).
	StopSignal syscall.Signal
	// StopGrace is how long the child has to exit after StopSignal before it
	// gets SIGKILL (default 5s).
	StopGrace time.Duration
	// OnStart, when set, is called from Run with the pid of each child it
	// started; OnExit with the pid and Wait's error of each child that
	// ended (a *exec.ExitError for a non-zero status or a signal), the
	// stopped one included. Both run on Run's goroutine and must not block.
	OnStart func(pid int)
	OnExit  func(pid int, err error)
}

func (c *Config) defaults() {
	if c.MinBackoff <= 0 {
		c.MinBackoff = time.Second
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = 30 * time.Second
	}
	c.MaxBackoff = max(c.MaxBackoff, c.MinBackoff)
	if c.ResetAfter <= 0 {
		c.ResetAfter = time.Minute
	}
	if c.StopGrace <= 0 {
		c.StopGrace = 5 * time.Second
	}
	if c.StopSignal == 0 {
		c.StopSignal = syscall.SIGTERM
	}
	if c.Stdout == nil {
		c.Stdout = os.Stderr
	}
	if c.Stderr == nil {
		c.Stderr = os.Stderr
	}
}

// Run runs the child, restarting it when it fails, until ctx ends or the
// child exits 0 on its own; when ctx ends it stops the child (StopSignal,
// SIGKILL after StopGrace) and returns nil once the child has exited. It returns an error at once only for a Config it
// cannot use. log may be nil.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if cfg.Executable == "" {
		return errors.New("supervise: no executable")
	}
	cfg.defaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("child", cfg.Name)
	backoff := cfg.MinBackoff
	for ctx.Err() == nil {
		ran, stopped, err := runOnce(ctx, &cfg, log)
		if stopped {
			return nil
		}
		if err == nil && ran > 0 {
			log.Info("child finished (exit status 0): not restarted")
			return nil
		}
		if ran >= cfg.ResetAfter {
			backoff = cfg.MinBackoff
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, cfg.MaxBackoff)
	}
	return nil
}

// runOnce starts the child and waits until it exits (ran: how long it ran)
// or ctx ends (stopped: it was stopped and has exited).
func runOnce(ctx context.Context, cfg *Config, log *slog.Logger) (ran time.Duration, stopped bool, err error) {
	cmd := exec.Command(cfg.Executable, cfg.Args...)
	cmd.Env = cfg.Env
	cmd.Stdout, cmd.Stderr = cfg.Stdout, cfg.Stderr
	cmd.SysProcAttr = sysProcAttr()
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		log.Error("child did not start", "err", err)
		return 0, false, err
	}
	pid := cmd.Process.Pid
	log.Info("child started", "pid", pid)
	if cfg.OnStart != nil {
		cfg.OnStart(pid)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
		log.Warn("child exited", "pid", pid, "err", err, "ran", time.Since(t0).Round(time.Millisecond))
	case <-ctx.Done():
		stopped = true
		err = stop(cmd, done, cfg.StopSignal, cfg.StopGrace, log)
	}
	if cfg.OnExit != nil {
		cfg.OnExit(pid, err)
	}
	return time.Since(t0), stopped, err
}

// stop ends a running child: sig, then SIGKILL after grace (at once where
// sig cannot be sent). It returns Wait's error.
func stop(cmd *exec.Cmd, done <-chan error, sig syscall.Signal, grace time.Duration, log *slog.Logger) error {
	pid := cmd.Process.Pid
	if err := cmd.Process.Signal(sig); err != nil {
		if errors.Is(err, os.ErrProcessDone) {
			return <-done
		}
		log.Warn("child: stop signal failed; killing it", "pid", pid, "signal", sig, "err", err)
		cmd.Process.Kill()
		return <-done
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case err := <-done:
		log.Info("child stopped", "pid", pid)
		return err
	case <-t.C:
		log.Warn("child did not exit after its stop signal; killing it", "pid", pid, "signal", sig, "grace", grace)
		cmd.Process.Kill()
		return <-done
	}
}

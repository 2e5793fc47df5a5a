package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// lockedBuffer collects a process's output while it runs.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// listenAddr is the address in the broker's "broker listening" log line, or "".
func listenAddr(log string) string {
	for _, line := range strings.Split(log, "\n") {
		if _, rest, ok := strings.Cut(line, `msg="broker listening" addr=`); ok {
			return strings.Fields(rest)[0]
		}
	}
	return ""
}

// TestBroker builds the broker of this module and runs a small load of each mode against
// it: the load test and the real stream agree, and nothing is lost.
func TestBroker(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the broker")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "broker")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	build := exec.CommandContext(ctx, goTool, "build", "-o", bin, ".")
	build.Dir = ".." // the module root, where package main of the broker is
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	broker := exec.CommandContext(ctx, bin, "--ntp_server=", "--port", "0",
		"--db", filepath.Join(dir, "db"), "--max_user_streams", "100")
	for _, kv := range os.Environ() { // the broker's own settings only
		if !strings.HasPrefix(kv, "BROKER_") {
			broker.Env = append(broker.Env, kv)
		}
	}
	var log lockedBuffer
	broker.Stdout, broker.Stderr = &log, &log
	if err := broker.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- broker.Wait() }()
	defer func() {
		broker.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			broker.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Log("broker's log:\n" + log.String())
		}
	}()

	// The kernel chose the port; the broker names it in its log once it listens.
	for listenAddr(log.String()) == "" {
		select {
		case err := <-exited:
			exited <- err // for the deferred stop
			t.Fatalf("the broker exited before listening: %v\n%s", err, log.String())
		case <-ctx.Done():
			t.Fatalf("the broker did not listen:\n%s", log.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	url := "http://" + listenAddr(log.String())
	pid := fmt.Sprint(broker.Process.Pid)
	for _, args := range [][]string{
		{"fanout", "--streams", "50", "--events", "100", "--publishers", "4"},
		{"fanout", "--streams", "20", "--events", "20", "--rate", "100"},
		{"inserts", "--events", "200", "--publishers", "8"},
		{"idle", "--streams", "50", "--hold", "0s"},
	} {
		cfg := testConfig(t, url, args[0], append(args[1:], "--pid", pid, "--timeout", "60s")...)
		res := runFor(t, cfg)
		if len(res.problems) > 0 {
			t.Errorf("%s: %v", args, res.problems)
		}
		if cfg.mode == "fanout" && (res.received != res.expected || res.expected != int64(cfg.streams*cfg.events)) {
			t.Errorf("%s: %d of %d deliveries", args, res.received, res.expected)
		}
		if res.cpu.server <= 0 && cfg.mode != "idle" {
			t.Errorf("%s: no broker CPU measured", args)
		}
	}
}

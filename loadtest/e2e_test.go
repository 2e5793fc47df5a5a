package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
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

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
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

	port := freePort(t)
	broker := exec.CommandContext(ctx, bin, "--ntp_server=", "--port", fmt.Sprint(port),
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

	url := fmt.Sprintf("http://127.0.0.1:%d", port)
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

package main

import (
	"os"
	"testing"
)

func TestParseVmRSS(t *testing.T) {
	status := "Name:\tbroker\nVmPeak:\t 2000000 kB\nVmRSS:\t   77824 kB\nRssAnon:\t 100 kB\n"
	if got, err := parseVmRSS(status); err != nil || got != 77824<<10 {
		t.Errorf("parseVmRSS = %d, %v; want %d", got, err, 77824<<10)
	}
	for _, bad := range []string{"Name:\tbroker\n", "VmRSS:\t12 MB\n", "VmRSS:\tx kB\n"} {
		if _, err := parseVmRSS(bad); err == nil {
			t.Errorf("parseVmRSS(%q) succeeded", bad)
		}
	}
}

func TestParseStatCPU(t *testing.T) {
	// The name may hold spaces and parentheses; utime (field 14) = 250, stime (15) = 42.
	stat := "4242 (bro ker) (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 42 0 0 20 0 9 0 5555 999999 3000"
	if state, got, err := parseStatCPU(stat); err != nil || got != 292 || state != "S" {
		t.Errorf("parseStatCPU = %q, %d, %v; want S, 292", state, got, err)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 10 x 0"} {
		if _, _, err := parseStatCPU(bad); err == nil {
			t.Errorf("parseStatCPU(%q) succeeded", bad)
		}
	}
}

func TestParseNofile(t *testing.T) {
	limits := "Limit                     Soft Limit           Hard Limit           Units     \n" +
		"Max processes             95000                95000                processes \n" +
		"Max open files            20000                20000                files     \n"
	if got, err := parseNofile(limits); err != nil || got != 20000 {
		t.Errorf("parseNofile = %d, %v; want 20000", got, err)
	}
	if _, err := parseNofile("Max processes 1 1 processes\n"); err == nil {
		t.Error("parseNofile without the line succeeded")
	}
}

func TestParseMachineCPU(t *testing.T) {
	// user nice system idle iowait irq softirq steal
	busy, total, err := parseMachineCPU("cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
	if err != nil || busy != 170 || total != 990 {
		t.Errorf("parseMachineCPU = %d, %d, %v; want 170, 990", busy, total, err)
	}
	if _, _, err := parseMachineCPU("intr 1 2 3\n"); err == nil {
		t.Error("parseMachineCPU without the cpu line succeeded")
	}
}

func TestReadSelf(t *testing.T) {
	pid := os.Getpid()
	if rss, err := readRSS(pid); err != nil || rss <= 0 {
		t.Errorf("readRSS(self) = %d, %v", rss, err)
	}
	if _, err := readCPU(pid); err != nil {
		t.Errorf("readCPU(self): %v", err)
	}
	if files, err := readNofile(pid); err != nil || files == 0 {
		t.Errorf("readNofile(self) = %d, %v", files, err)
	}
	if u := sampleUsage(pid); u.machineAll == 0 {
		t.Errorf("sampleUsage: no machine counters: %+v", u)
	}
	limit, err := raiseFileLimit()
	if err != nil || limit < 64 {
		t.Errorf("raiseFileLimit = %d, %v", limit, err)
	}
}

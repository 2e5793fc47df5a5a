package main

import (
	"os"
	"testing"
)

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

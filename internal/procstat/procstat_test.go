package procstat

import (
	"os"
	"testing"
)

func TestVmRSS(t *testing.T) {
	status := "Name:\tbroker\nVmPeak:\t 2000000 kB\nVmHWM:\t  900000 kB\nVmRSS:\t  126361 kB\nRssAnon:\t  100 kB\n"
	if got, err := VmRSS(status); err != nil || got != 126361<<10 {
		t.Errorf("VmRSS = %d, %v; want %d", got, err, 126361<<10)
	}
	for _, bad := range []string{"Name:\tbroker\n", "VmRSS:\t12 MB\n", "VmRSS:\tx kB\n"} {
		if _, err := VmRSS(bad); err == nil {
			t.Errorf("VmRSS(%q) succeeded", bad)
		}
	}
}

func TestStat(t *testing.T) {
	// The name may hold spaces and parentheses; utime (field 14) = 250, stime (15) = 42.
	stat := "4242 (bro ker) (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 42 0 0 20 0 9 0 5555 999999 3000"
	if state, got, err := Stat(stat); err != nil || got != 292 || state != "S" {
		t.Errorf("Stat = %q, %d, %v; want S, 292", state, got, err)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 10 x 0"} {
		if _, _, err := Stat(bad); err == nil {
			t.Errorf("Stat(%q) succeeded", bad)
		}
	}
}

func TestReadSelf(t *testing.T) {
	pid := os.Getpid()
	if rss, err := RSS(pid); err != nil || rss <= 0 {
		t.Errorf("RSS(self) = %d, %v", rss, err)
	}
	if _, err := CPU(pid); err != nil {
		t.Errorf("CPU(self): %v", err)
	}
}

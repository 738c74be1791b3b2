package framework

import (
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"
)

// TestPauseStopsEveryThread: Pause returns only once every thread of the
// process has stopped. The child keeps four threads busy (each locked to
// its goroutine, spinning): SIGSTOP reaches each when it next handles it,
// and until the last has, the process still runs.
func TestPauseStopsEveryThread(t *testing.T) {
	if os.Getenv("CAIRN_PAUSE_CHILD") == "1" {
		for range 4 {
			go func() {
				runtime.LockOSThread()
				for n := 0; ; n++ {
					_ = n * n
				}
			}()
		}
		time.Sleep(time.Minute)
		return
	}
	p := NewProcess(t, "spinner", t.TempDir(), os.Args[0], []string{"-test.run=^TestPauseStopsEveryThread$", "-test.count=1"},
		"CAIRN_PAUSE_CHILD=1", "GOMAXPROCS=4")
	p.Start()
	// Wait until the spinners run: at least 5 threads.
	deadline := time.Now().Add(10 * time.Second)
	for {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", p.PID()))
		if err == nil && len(tasks) >= 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the child never started its spinning threads (%v)", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for range 5 {
		p.Pause()
		running, err := runningThreads(p.PID())
		if err != nil {
			t.Fatal(err)
		}
		if running != "" {
			t.Fatalf("after Pause returned: %s", running)
		}
		p.Resume()
	}
	p.Kill()
}

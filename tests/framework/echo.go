package framework

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// EchoServer is tests/echoserver running as its own process: kms.v1.KMS
// over the same mTLS as a KMS server, with no interceptors and no work
// (the floor the out-of-process benchmarks measure Cairn against).
type EchoServer struct {
	*Process
	// Addr is where it serves.
	Addr string
	// Name is its identity (<tier>/<region>/<name>; Mint it first if the
	// world's dev CA does not have it).
	Name  string
	w     *World
	conns connCache
}

// EchoServer starts an echo server as identity name on a free port and
// waits until it answers.
func (w *World) EchoServer(name string) *EchoServer {
	w.T.Helper()
	e := &EchoServer{Addr: fmt.Sprintf("127.0.0.1:%d", FreePorts(w.T, 1)[0]), Name: name, w: w}
	args := append(w.IDFlags(name), "--listen", e.Addr)
	e.Process = NewProcess(w.T, "echo-"+strings.ReplaceAll(name, "/", "-"), w.Logs, w.Bin.Echo, args)
	e.Start()
	// The smallest ciphertext it accepts: a prefix, a nonce and a tag.
	probe := &kmsv1.DecryptRequest{Ciphertext: make([]byte, 33)}
	waitStatus(w.T, e.Process, e.Process.Name(), "answering", func() (*kmsv1.DecryptResponse, error) {
		ctx, cancel := context.WithTimeout(context.Background(), pollRPCTimeout)
		defer cancel()
		return e.Client(Regionctl).Decrypt(ctx, probe)
	}, func(*kmsv1.DecryptResponse) bool { return true })
	return e
}

// Conn returns the connection to the echo server as caller name (one per
// name, closed when the test ends); it accepts only the echo's identity.
func (e *EchoServer) Conn(name string) *grpc.ClientConn {
	e.w.T.Helper()
	return e.conns.get(e.w, e.Addr, name, e.Name)
}

// Client returns a kms.v1.KMS client of the echo server, calling as name.
func (e *EchoServer) Client(name string) kmsv1.KMSClient {
	e.w.T.Helper()
	return kmsv1.NewKMSClient(e.Conn(name))
}

// Usage is what a process has used so far: CPU time (user and system, all
// threads) and resident memory, from /proc.
type Usage struct {
	CPU time.Duration
	RSS int64 // bytes
}

// clockTick is the unit of the CPU times in /proc/<pid>/stat (USER_HZ,
// 100 on every Linux architecture Go supports).
const clockTick = 10 * time.Millisecond

// Usage reads the running process's CPU time and resident memory.
func (p *Process) Usage() (Usage, error) {
	pid := p.PID()
	if pid == 0 {
		return Usage{}, fmt.Errorf("%s: not running", p.name)
	}
	return ProcUsage(pid)
}

// ProcUsage reads pid's CPU time (utime + stime, fields 14 and 15 of
// /proc/<pid>/stat, in clock ticks) and VmRSS (/proc/<pid>/status).
func ProcUsage(pid int) (Usage, error) {
	f, err := statFields(pid)
	if err != nil {
		return Usage{}, err
	}
	if len(f) < 13 {
		return Usage{}, fmt.Errorf("/proc/%d/stat: %d fields after the name, want at least 13", pid, len(f))
	}
	var ticks int64
	for _, v := range f[11:13] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return Usage{}, fmt.Errorf("/proc/%d/stat: CPU time %q: %v", pid, v, err)
		}
		ticks += n
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Usage{}, err
	}
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return Usage{}, fmt.Errorf("/proc/%d/status: VmRSS %q: %v", pid, v, err)
			}
			return Usage{CPU: time.Duration(ticks) * clockTick, RSS: kb << 10}, nil
		}
	}
	return Usage{}, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

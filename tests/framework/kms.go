package framework

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// KMSBinary and RegionctlBinary are the paths of cmd/kms and cmd/regionctl,
// which Build puts next to the others.
func (b *Binaries) KMSBinary() string       { return filepath.Join(b.Dir, "kms") }
func (b *Binaries) RegionctlBinary() string { return filepath.Join(b.Dir, "regionctl") }

// RegionctlOK runs cmd/regionctl with args and fails the test unless it exits 0.
func (w *World) RegionctlOK(args ...string) Result {
	w.T.Helper()
	name := "regionctl"
	for _, a := range args[:min(2, len(args))] {
		name += "-" + a
	}
	r := w.Run(name, w.Bin.RegionctlBinary(), args...)
	if r.ExitCode != 0 {
		w.T.Fatalf("regionctl failed:\n%s", r)
	}
	return r
}

// KMSServer is one cmd/kms process of a World: a regional KMS server.
type KMSServer struct {
	*Process
	w *World
	// Identity is its name, kms/<region>/<name>; Region its region.
	Identity, Region string
	// Addr is its 127.0.0.1:port listener, fixed across restarts.
	Addr string
	// StateDir holds the wrapped bundle and audit.log.
	StateDir string

	conns connCache
}

// KMSServers describes one KMS server per identity (kms/<region>/<name>,
// minted first unless `cairn dev certs` made it), on ports chosen now,
// pinning the bundle-signing public key signingPub and fetching region keys
// from the root KMS replicas at rootKMS. None is started.
func (w *World) KMSServers(region, signingPub string, rootKMS []string, identities ...string) []*KMSServer {
	w.T.Helper()
	ports := FreePorts(w.T, len(identities))
	var out []*KMSServer
	for i, name := range identities {
		s := &KMSServer{w: w, Identity: name, Region: region,
			Addr:     fmt.Sprintf("127.0.0.1:%d", ports[i]),
			StateDir: filepath.Join(w.Dir, "state", strings.ReplaceAll(name, "/", "-"))}
		args := append(w.IDFlags(name), "--region", region, "--listen", s.Addr, "--state-dir", s.StateDir,
			"--rootkms", strings.Join(rootKMS, ","), "--signing-key", signingPub, "-v")
		s.Process = NewProcess(w.T, strings.ReplaceAll(name, "/", "-"), w.Logs, w.Bin.KMSBinary(), args)
		out = append(out, s)
	}
	return out
}

// AddArgs appends flags to the server's command line (for example
// --transit-listen); they take effect at its next Start.
func (s *KMSServer) AddArgs(args ...string) {
	s.Process.mu.Lock()
	defer s.Process.mu.Unlock()
	s.Process.args = append(s.Process.args, args...)
}

// conn returns a connection to the server as name, made once and closed when
// the test ends; it accepts only a KMS server of the server's region.
func (s *KMSServer) conn(name string) *grpc.ClientConn {
	s.w.T.Helper()
	return s.conns.get(s.w, s.Addr, name, "kms/"+s.Region+"/*")
}

// Client returns a data-plane client of this server, calling as name.
func (s *KMSServer) Client(name string) kmsv1.KMSClient {
	s.w.T.Helper()
	return kmsv1.NewKMSClient(s.conn(name))
}

// Admin returns an admin client of this server, calling as name.
func (s *KMSServer) Admin(name string) kmsv1.KMSAdminClient {
	s.w.T.Helper()
	return kmsv1.NewKMSAdminClient(s.conn(name))
}

// Status asks for the server's readiness (as regionctl).
func (s *KMSServer) Status() (*kmsv1.GetStatusResponse, error) {
	s.w.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), pollRPCTimeout)
	defer cancel()
	return s.Admin(Regionctl).GetStatus(ctx, &kmsv1.GetStatusRequest{})
}

// WaitStatus polls GetStatus until ok accepts the reply, and returns the
// reply and how long it took. It fails the test after WaitTimeout, or at once
// if the process exits.
func (s *KMSServer) WaitStatus(what string, ok func(*kmsv1.GetStatusResponse) bool) (*kmsv1.GetStatusResponse, time.Duration) {
	s.w.T.Helper()
	return waitStatus(s.w.T, s.Process, s.Identity, what, s.Status, ok)
}

// WaitServing waits until the server reports SERVING with the given bundle
// serial.
func (s *KMSServer) WaitServing(serial uint64) (*kmsv1.GetStatusResponse, time.Duration) {
	s.w.T.Helper()
	return s.WaitStatus(fmt.Sprintf("SERVING bundle serial %d", serial), func(st *kmsv1.GetStatusResponse) bool {
		return st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING && st.GetBundle().GetSerial() == serial
	})
}

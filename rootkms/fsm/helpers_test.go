package fsm_test

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/rootkmstest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// t0 is the first proposer time of the tests.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// at returns t0 + s seconds.
func at(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }

var kcv = rootkmstest.KCV()

// applyBytes applies data as the next LogCommand entry of f.
func applyBytes(f *fsm.FSM, data []byte) any {
	return f.Apply(&raft.Log{Type: raft.LogCommand, Index: f.AppliedIndex() + 1, Term: 1, Data: data})
}

// encode returns cmd's bytes, bypassing EncodeCommand's checks so that tests
// can build commands EncodeCommand would refuse.
func encode(t testing.TB, cmd *statev1.Command) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(cmd)
	if err != nil {
		t.Fatalf("Marshal(%v) = %v", cmd, err)
	}
	return b
}

// apply applies cmd as the next entry of f and returns the Result.
func apply(t testing.TB, f *fsm.FSM, cmd *statev1.Command) *fsm.Result {
	t.Helper()
	out := applyBytes(f, encode(t, cmd))
	res, ok := out.(*fsm.Result)
	if !ok {
		t.Fatalf("Apply(%v) = %T, want *fsm.Result", cmd, out)
	}
	return res
}

// mustApply applies cmds in order, failing t on any refusal.
func mustApply(t testing.TB, f *fsm.FSM, cmds ...*statev1.Command) {
	t.Helper()
	for _, cmd := range cmds {
		if res := apply(t, f, cmd); res.Err != nil {
			t.Fatalf("Apply(%v).Err = %v, want nil", cmd, res.Err)
		}
	}
}

// restoreBytes restores f from b.
func restoreBytes(f *fsm.FSM, b []byte) error {
	return f.Restore(&readCloser{Reader: bytes.NewReader(b)})
}

// readCloser records Close.
type readCloser struct {
	io.Reader
	closed bool
}

func (r *readCloser) Close() error { r.closed = true; return nil }

const (
	unspecified = cryptov1.KeyStatus_KEY_STATUS_UNSPECIFIED
	enabled     = cryptov1.KeyStatus_KEY_STATUS_ENABLED
	primary     = cryptov1.KeyStatus_KEY_STATUS_PRIMARY
	disabled    = cryptov1.KeyStatus_KEY_STATUS_DISABLED
	destroyed   = cryptov1.KeyStatus_KEY_STATUS_DESTROYED
)

// euSetup builds region "eu" with versions 1 (ENABLED, superseded), 2
// (PRIMARY), 3 (DISABLED), 4 (DESTROYED), 5 (ENABLED), region "us" with
// version 1, and member node-1.
func euSetup() []*statev1.Command {
	return []*statev1.Command{
		rootkmstest.CreateRegion("eu", rootkmstest.Wrapped("eu", 1), kcv, at(0)),
		rootkmstest.AddVersion("eu", 2, rootkmstest.Wrapped("eu", 2), kcv, true, at(10)),
		rootkmstest.AddVersion("eu", 3, rootkmstest.Wrapped("eu", 3), kcv, false, at(20)),
		rootkmstest.SetStatus("eu", 3, disabled, at(30)),
		rootkmstest.AddVersion("eu", 4, rootkmstest.Wrapped("eu", 4), kcv, false, at(40)),
		rootkmstest.SetStatus("eu", 4, disabled, at(41)),
		rootkmstest.SetStatus("eu", 4, destroyed, at(42)),
		rootkmstest.AddVersion("eu", 5, rootkmstest.Wrapped("eu", 5), kcv, false, at(50)),
		rootkmstest.CreateRegion("us", rootkmstest.Wrapped("us", 1), kcv, at(60)),
		rootkmstest.RegisterMember("node-1", "10.0.0.1:8443", at(70)),
	}
}

// setupFSM returns an FSM with euSetup applied.
func setupFSM(t testing.TB) *fsm.FSM {
	t.Helper()
	f := rootkmstest.NewFSM()
	mustApply(t, f, euSetup()...)
	return f
}

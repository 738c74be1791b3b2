package raftnode_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/rootkms/raftnode"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func replicas() identity.Authorizer {
	a, _ := identity.ParseAllowlist(identitytest.TrustDomain, "rootkms/*/*")
	return a.Authorize
}

func layer(t *testing.T, pki *identitytest.PKI, id string) *raftnode.StreamLayer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := raftnode.NewStreamLayer(lis, nil, pki.Source(id), replicas(), nil)
	t.Cleanup(func() { l.Close() })
	return l
}

func TestStreamLayer(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	a := layer(t, pki, "spiffe://cairn.test/rootkms/global/rootkms-1")
	b := layer(t, pki, "spiffe://cairn.test/rootkms/us-east/replica-1")
	got := make(chan []byte, 1)
	go func() {
		c, err := a.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		buf := make([]byte, 5)
		io.ReadFull(c, buf)
		got <- buf
	}()
	c, err := b.Dial(raft.ServerAddress(a.Addr().String()), 5*time.Second)
	if err != nil {
		t.Fatalf("Dial between replicas = %v", err)
	}
	c.Write([]byte("hello"))
	if g := <-got; string(g) != "hello" {
		t.Errorf("peer received %q, want hello", g)
	}
	c.Close()

	// A KMS identity (valid certificate, wrong tier) can neither dial a
	// replica's Raft port nor be dialled as one.
	kms := layer(t, pki, "spiffe://cairn.test/kms/us-east/kms-1")
	if c, err := kms.Dial(raft.ServerAddress(a.Addr().String()), 5*time.Second); err == nil {
		// TLS 1.3: the refusal may arrive on first read.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("a KMS identity got a Raft connection")
		}
		c.Close()
	}
	if _, err := a.Dial(raft.ServerAddress(kms.Addr().String()), 5*time.Second); err == nil || !strings.Contains(err.Error(), "not on the allowlist") {
		t.Errorf("dialling a KMS as a Raft peer = %v, want refusal", err)
	}
	// A peer that connects and never handshakes does not block Accept.
	stall, err := net.Dial("tcp", a.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer stall.Close()
	go func() {
		c, err := a.Accept()
		if err == nil {
			c.Close()
		}
	}()
	if c, err := b.Dial(raft.ServerAddress(a.Addr().String()), 5*time.Second); err != nil {
		t.Errorf("Dial while another peer stalls its handshake = %v", err)
	} else {
		c.Close()
	}
}

type nopFSM struct{}

func (nopFSM) Apply(*raft.Log) any                 { return nil }
func (nopFSM) Snapshot() (raft.FSMSnapshot, error) { return nopSnap{}, nil }
func (nopFSM) Restore(rc io.ReadCloser) error      { return rc.Close() }

type nopSnap struct{}

func (nopSnap) Persist(s raft.SnapshotSink) error { s.Write([]byte("state")); return s.Close() }
func (nopSnap) Release()                          {}

func open(t *testing.T, dir string) (*raftnode.Node, error) {
	_, trans := raft.NewInmemTransport("")
	return raftnode.Open(raftnode.Config{ID: "n1", Dir: dir, FSM: nopFSM{}, Transport: trans, Bootstrap: true,
		HeartbeatTimeout: 50 * time.Millisecond, ElectionTimeout: 50 * time.Millisecond, LeaderLeaseTimeout: 50 * time.Millisecond})
}

func TestOpenRefusesCorruptState(t *testing.T) {
	dir := t.TempDir()
	n, err := open(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for n.Raft.State() != raft.Leader && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	for range 10 {
		if err := n.Raft.Apply([]byte("x"), time.Second).Error(); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "raft.db")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("raft.db mode = %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	db, _ := os.ReadFile(filepath.Join(dir, "raft.db"))
	snaps, _ := filepath.Glob(filepath.Join(dir, "snapshots", "*", "state.bin"))
	if len(snaps) != 1 {
		t.Fatalf("snapshots = %v, want one", snaps)
	}
	snap, _ := os.ReadFile(snaps[0])

	tests := []struct {
		name   string
		damage func()
		repair func()
		want   string
	}{
		{"garbage bolt file", func() { os.WriteFile(filepath.Join(dir, "raft.db"), bytes.Repeat([]byte{0xAB}, len(db)), 0o600) },
			func() { os.WriteFile(filepath.Join(dir, "raft.db"), db, 0o600) }, "raft.db is corrupt"},
		{"truncated bolt file", func() { os.WriteFile(filepath.Join(dir, "raft.db"), db[:len(db)/3], 0o600) },
			func() { os.WriteFile(filepath.Join(dir, "raft.db"), db, 0o600) }, "raft.db is corrupt"},
		{"truncated snapshot", func() { os.WriteFile(snaps[0], snap[:len(snap)/2], 0o600) },
			func() { os.WriteFile(snaps[0], snap, 0o600) }, "snapshot"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.damage()
			defer tt.repair()
			n, err := open(t, dir)
			if err == nil {
				n.Close()
				t.Fatalf("Open with a %s = nil error, want a refusal", tt.name)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Open with a %s = %v, want an error mentioning %q", tt.name, err, tt.want)
			}
		})
	}
	// Repaired, it opens again.
	n, err = open(t, dir)
	if err != nil {
		t.Fatalf("Open after repair = %v", err)
	}
	n.Close()
}

func TestLoggerAdapter(t *testing.T) {
	var buf bytes.Buffer
	l := raftnode.NewLogger(slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})), "raft")
	l.Debug("hidden", "k", 1)
	l.Named("net").Info("peer joined", "id", "rootkms-2")
	l.With("term", 7).Warn("lost leadership")
	l.Info("configuration", "servers", hclog.Fmt("%+v", []int{1, 2}))
	out := buf.String()
	for _, want := range []string{`"msg":"peer joined"`, `"id":"rootkms-2"`, `"logger":"raft.net"`, `"msg":"lost leadership"`, `"term":7`, `"level":"WARN"`, `"servers":"[1 2]"`} {
		if !strings.Contains(out, want) {
			t.Errorf("slog output %s lacks %s", out, want)
		}
	}
	if strings.Contains(out, "hidden") {
		t.Errorf("a debug record passed an info-level slog handler")
	}
	var _ hclog.Logger = l
	_ = context.Background()
}

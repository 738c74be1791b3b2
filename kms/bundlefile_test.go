package kms_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// The server keeps no signed bundle in memory: GetStatus's include_bundle,
// the shrink guard and the apply that keeps the previous bundle read them
// from the state directory, checked against what the server holds of them.

// includeBundle returns s's status with the signed bundles.
func includeBundle(t *testing.T, s *server) (*kmsv1.GetStatusResponse, error) {
	t.Helper()
	return s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{IncludeBundle: true})
}

// wantBundles fails the test unless GetStatus(include_bundle) answers with
// exactly served and previous (nil: none).
func wantBundles(t *testing.T, s *server, served, previous *bundlev1.SignedBundle) {
	t.Helper()
	st, err := includeBundle(t, s)
	if err != nil {
		t.Fatalf("GetStatus(include_bundle) = %v", err)
	}
	if !proto.Equal(st.GetServedBundle(), served) {
		t.Errorf("served_bundle = serial %d, want serial %d (exactly the applied signed bundle)", serialOf(t, st.GetServedBundle()), serialOf(t, served))
	}
	if !proto.Equal(st.GetPreviousBundle(), previous) {
		t.Errorf("previous_bundle = serial %d, want serial %d (exactly the applied signed bundle)", serialOf(t, st.GetPreviousBundle()), serialOf(t, previous))
	}
}

// serialOf is sb's serial (0 for none).
func serialOf(t *testing.T, sb *bundlev1.SignedBundle) uint64 {
	t.Helper()
	if sb == nil {
		return 0
	}
	return refOf(t, sb).GetSerial()
}

// TestStatusBundlesAcrossApplies: after each apply GetStatus returns exactly
// the signed bundles applied (served and previous), re-signed bundles of the
// same content included, and so does a restarted server.
func TestStatusBundlesAcrossApplies(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	s := e.start(kms1ID, dir)
	other := kmstest.NewKeyset(t, "payments/refunds", nil)
	first, second, third := e.bundle(e.ks), e.bundle(e.ks, other), e.bundle(e.ks, other)

	e.apply(s, first)
	wantBundles(t, s, first, nil)
	e.apply(s, second)
	wantBundles(t, s, second, first)
	e.apply(s, second) // the served bundle again: nothing changes
	wantBundles(t, s, second, first)
	e.apply(s, third)
	wantBundles(t, s, third, second)

	s.Close()
	s = e.start(kms1ID, dir)
	waitReady(t, s)
	wantBundles(t, s, third, second)
	fourth := e.bundle(e.ks, other)
	e.apply(s, fourth) // the bundle loaded at boot becomes the previous one
	wantBundles(t, s, fourth, third)
}

// damage is a way a bundle file can stop holding what the server wrote.
type damage struct {
	name string
	do   func(t *testing.T, e *env, path string)
}

var damages = []damage{
	{"deleted", func(t *testing.T, e *env, path string) {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
	}},
	{"a byte flipped", func(t *testing.T, e *env, path string) {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		data[len(data)/2] ^= 0x01
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}},
	{"another valid bundle", func(t *testing.T, e *env, path string) {
		writeSigned(t, path, e.bundle(e.ks))
	}},
	{"the same bundle under another signing key ID", func(t *testing.T, e *env, path string) {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var sb bundlev1.SignedBundle
		if err := proto.Unmarshal(data, &sb); err != nil {
			t.Fatal(err)
		}
		sb.SigningKeyId += "-forged"
		writeSigned(t, path, &sb)
	}},
	{"a field added", func(t *testing.T, e *env, path string) {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		data = append(data, 15<<3, 1) // field 15, varint 1: not in SignedBundle
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}},
	{"unreadable (a directory)", func(t *testing.T, e *env, path string) {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(path, 0o700); err != nil {
			t.Fatal(err)
		}
	}},
}

func writeSigned(t *testing.T, path string, sb *bundlev1.SignedBundle) {
	t.Helper()
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(sb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestStatusBundleFileDamaged: a bundle file that no longer holds what the
// server wrote (missing, unreadable, or different) makes GetStatus's
// include_bundle fail with DATA_LOSS naming the file and the cure, and stops
// nothing else: the data plane and GetStatus without bundles go on. A
// damaged BundleFile also refuses a new bundle (the shrink guard needs the
// served one), changing nothing. Pushing the served bundle again is the
// cure: it rewrites BundleFile, or drops the previous bundle.
func TestStatusBundleFileDamaged(t *testing.T) {
	for _, file := range []string{kms.BundleFile, kms.PreviousBundleFile} {
		for _, d := range damages {
			t.Run(file+"/"+d.name, func(t *testing.T) {
				e := newEnv(t)
				s := e.start(kms1ID, "")
				first, second := e.bundle(e.ks), e.bundle(e.ks)
				e.apply(s, first)
				e.apply(s, second)
				c := e.client(appID, s)
				ct := encrypt(t, c, ledger, []byte("dek"), nil).GetCiphertext()

				path := filepath.Join(s.dir, file)
				d.do(t, e, path)

				_, err := includeBundle(t, s)
				t.Logf("GetStatus(include_bundle) = %v", err)
				msg := status.Convert(err).Message()
				wantMsg := []string{path, "push the bundle served (serial 2 sha256", "again"}
				if file == kms.BundleFile {
					wantMsg = []string{path, "goes on serving that bundle from memory", "push bundle serial 2 sha256", "again"}
				}
				if status.Code(err) != codes.DataLoss || !containsAll(msg, wantMsg) {
					t.Errorf("GetStatus(include_bundle) = %v; want DataLoss naming %q", err, wantMsg)
				}
				// Nothing else stops.
				if st := s.status(t); st.GetState() != kmsv1.ServingState_SERVING_STATE_SERVING || !refEqual(st.GetBundle(), refOf(t, second)) {
					t.Errorf("GetStatus() = %v serving %v; want SERVING serial 2", st.GetState(), st.GetBundle())
				}
				if got := decrypt(t, c, ledger, ct, nil).GetPlaintext(); string(got) != "dek" {
					t.Errorf("Decrypt = %q, want %q", got, "dek")
				}
				encrypt(t, c, ledger, []byte("dek"), nil)

				if file == kms.BundleFile {
					// The shrink guard cannot run: a new bundle is refused.
					third := e.bundle(e.ks)
					_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: third})
					if status.Code(err) != codes.DataLoss || !strings.Contains(status.Convert(err).Message(), "shrink guard") {
						t.Errorf("ApplyBundle(serial 3) with %s damaged = %v, want DataLoss naming the shrink guard", file, err)
					}
					if st := s.status(t); !refEqual(st.GetBundle(), refOf(t, second)) {
						t.Errorf("after the refusal serving %v, want serial 2", st.GetBundle())
					}
				}

				// The cure: push the served bundle again.
				if file == kms.BundleFile && d.name == "unreadable (a directory)" {
					if err := os.Remove(path); err != nil { // the server does not remove a directory in its place
						t.Fatal(err)
					}
				}
				e.apply(s, second)
				if file == kms.BundleFile {
					wantBundles(t, s, second, first)
					if got := s.persisted(t); !proto.Equal(unmarshalSigned(t, got), second) {
						t.Errorf("%s after the cure does not hold the served bundle", file)
					}
				} else {
					wantBundles(t, s, second, nil)
					if _, err := os.Lstat(path); !os.IsNotExist(err) {
						t.Errorf("Lstat(%s) after the previous bundle was dropped = %v, want it removed", file, err)
					}
				}
				third := e.bundle(e.ks)
				e.apply(s, third)
				wantBundles(t, s, third, second)
			})
		}
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

func unmarshalSigned(t *testing.T, data []byte) *bundlev1.SignedBundle {
	t.Helper()
	var sb bundlev1.SignedBundle
	if err := proto.Unmarshal(data, &sb); err != nil {
		t.Fatal(err)
	}
	return &sb
}

// TestPreviousBundleNotKept: when the previous bundle cannot be written,
// the apply goes on (a warning in the log) and the server offers no
// previous bundle rather than a stale one.
func TestPreviousBundleNotKept(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	first, second, third := e.bundle(e.ks), e.bundle(e.ks), e.bundle(e.ks)
	e.apply(s, first)
	e.apply(s, second)
	// A directory that is not empty in the file's place: it can be
	// neither replaced nor removed.
	path := filepath.Join(s.dir, kms.PreviousBundleFile)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(path, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	e.apply(s, third)
	wantBundles(t, s, third, nil)
	if err := os.RemoveAll(path); err != nil {
		t.Fatal(err)
	}
	fourth := e.bundle(e.ks)
	e.apply(s, fourth)
	wantBundles(t, s, fourth, third)
}

// TestShrinkGuardAfterRestart: a server that booted from its persisted
// bundle guards against it, read back from its file.
func TestShrinkGuardAfterRestart(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	s := e.start(kms1ID, dir)
	kss := []*kmstest.Keyset{e.ks, kmstest.NewKeyset(t, "payments/refunds", nil), kmstest.NewKeyset(t, "search/index", nil)}
	served := e.bundle(kss...)
	e.apply(s, served)
	s.Close()
	s = e.start(kms1ID, dir)
	waitReady(t, s)
	_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.bundle(kss[0])})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "against the served serial 1, the bundle drops 2 of 3 keysets") {
		t.Errorf("ApplyBundle(truncated) after a restart = %v, want FailedPrecondition from the shrink guard", err)
	}
	next := e.bundle(kss...)
	e.apply(s, next)
	wantBundles(t, s, next, served)
}

// TestApplyRefusesUnknownWrapperFields: a signed bundle whose wrapper
// (SignedBundle, outside the signature) carries a field this server does
// not know is refused with INVALID_ARGUMENT saying so, dry run or not, and
// nothing is written: the signed bundle without it applies, and so does
// the next serial after it (a persisted wrapper with the field would have
// refused every later apply).
func TestApplyRefusesUnknownWrapperFields(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	clean := e.bundle(e.ks)
	sb := proto.Clone(clean).(*bundlev1.SignedBundle)
	sb.ProtoReflect().SetUnknown(protowire.AppendBytes(protowire.AppendTag(nil, 99, protowire.BytesType), []byte("x")))
	for _, dry := range []bool{true, false} {
		_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: sb, DryRun: dry})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "wrapper (SignedBundle) has fields this server does not know") ||
			!strings.Contains(err.Error(), "upgrade the server, or rebuild the bundle") {
			t.Errorf("ApplyBundle(dry run %v) of a bundle with an unknown wrapper field = %v, want InvalidArgument saying so", dry, err)
		}
	}
	if entries, err := os.ReadDir(s.dir); err != nil || len(entries) != 0 {
		t.Errorf("state directory after the refusals = %v (%v), want empty", entries, err)
	}
	if st := s.status(t); st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING {
		t.Errorf("serving after the refusals, want nothing applied")
	}
	if got := e.apply(s, clean).GetApplied().GetSerial(); got != 1 {
		t.Errorf("applied serial %d, want 1", got)
	}
	// The served bundle again, with the field: refused, the file unchanged.
	file := s.persisted(t)
	if _, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: sb}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ApplyBundle of the served bundle with an unknown wrapper field = %v, want InvalidArgument", err)
	}
	if !bytes.Equal(s.persisted(t), file) {
		t.Errorf("the bundle file changed on a refused apply")
	}
	if got := e.apply(s, e.bundle(e.ks)).GetApplied().GetSerial(); got != 2 {
		t.Errorf("applied serial %d, want 2", got)
	}
}

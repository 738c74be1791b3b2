package safe_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/secret"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// recoverWorld is a 3-of-5 genesis over file safes whose directories the
// test knows, so it can damage what a safe stores.
type recoverWorld struct {
	dir   string
	safes []safe.Safe
	m     *safev1.GenesisManifest
	rmk   secret.Bytes
}

func newRecoverWorld(t *testing.T) *recoverWorld {
	t.Helper()
	w := &recoverWorld{dir: t.TempDir()}
	for i := range 5 {
		w.safes = append(w.safes, openFileSafe(t, w.dir, fmt.Sprintf("safe-%d", i+1)))
	}
	m, rmk, err := safe.Genesis(context.Background(), safe.SplitConfig{Threshold: 3, Safes: w.safes})
	if err != nil {
		t.Fatalf("Genesis = %v", err)
	}
	t.Cleanup(rmk.Wipe)
	w.m, w.rmk = m, rmk
	return w
}

func (w *recoverWorld) ref(index uint32) safe.ShareRef {
	return safe.ShareRef{GenesisID: w.m.GetGenesisId(), Epoch: w.m.GetEpoch(), Index: index}
}

// flipStoredByte flips one bit of the last byte of the sealed record of share
// index (a byte of the AES-GCM tag), as a disk or a careless editor would.
func (w *recoverWorld) flipStoredByte(t *testing.T, index uint32) {
	t.Helper()
	r := w.ref(index)
	path := filepath.Join(w.dir, fmt.Sprintf("safe-%d", index), "shares", fmt.Sprintf("%s-%d-%d.sealed", r.GenesisID, r.Epoch, r.Index))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading the sealed share %s: %v", path, err)
	}
	b[len(b)-1] ^= 1
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// replaceWithFlippedShare reseals share index in its safe with one byte of
// the plaintext share flipped: the record authenticates, but the share no
// longer matches its commitment in the manifest (its MAC fails).
func (w *recoverWorld) replaceWithFlippedShare(t *testing.T, index uint32) {
	t.Helper()
	ctx := context.Background()
	s := w.safes[index-1]
	share, err := s.Unseal(ctx, w.ref(index))
	if err != nil {
		t.Fatal(err)
	}
	b := share.Data()
	share.Wipe()
	b[len(b)/2] ^= 0x80
	flipped := secret.New(b)
	clear(b)
	defer flipped.Wipe()
	if err := s.Destroy(ctx, w.ref(index)); err != nil {
		t.Fatal(err)
	}
	if err := s.Seal(ctx, w.ref(index), flipped); err != nil {
		t.Fatal(err)
	}
}

// TestRecoverErrorNamesShareAndSafe (RELIABILITY row 2 a): when a share
// fails, the error says which share index and which safe, for both ways a
// share can fail: a stored record with one byte flipped (ErrTampered from the
// safe) and a share whose plaintext has one byte flipped (its commitment MAC
// fails: ErrBadShare from the Combiner). With only K safes given, the
// recovery fails closed (threshold not met, no key returned).
func TestRecoverErrorNamesShareAndSafe(t *testing.T) {
	ctx := context.Background()
	w := newRecoverWorld(t)
	w.flipStoredByte(t, 2)
	w.replaceWithFlippedShare(t, 3)

	for _, tt := range []struct {
		name  string
		given []int // indices into w.safes
		want  error
		text  []string
	}{
		{"record with a flipped byte", []int{0, 1, 3}, safe.ErrTampered, []string{"share 2 from safe-2", "(2/3)"}},
		{"share with a flipped byte", []int{0, 2, 3}, safe.ErrBadShare, []string{"share 3 from safe-3", "index 3", "(2/3)"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rmk, err := safe.Recover(ctx, w.m, pick(w.safes, tt.given))
			if err == nil {
				rmk.Wipe()
				t.Fatalf("Recover(%v) = a key, want a failure naming the bad share", tt.given)
			}
			if !rmk.IsZero() {
				t.Errorf("Recover(%v) failed but returned key material", tt.given)
			}
			if !errors.Is(err, tt.want) || !errors.Is(err, safe.ErrThresholdNotMet) {
				t.Errorf("Recover(%v) = %v, want %v and ErrThresholdNotMet", tt.given, err, tt.want)
			}
			for _, s := range tt.text {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("Recover(%v) = %q, want it to name %q", tt.given, err, s)
				}
			}
		})
	}

	// The Combiner itself names the index it refuses, whether it checks or
	// adds the share.
	c, err := safe.NewCombiner(w.m)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Wipe()
	bad, err := w.safes[2].Unseal(ctx, w.ref(3))
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Wipe()
	for name, err := range map[string]error{"Check": c.Check(3, bad), "Add": c.Add(3, bad)} {
		if !errors.Is(err, safe.ErrBadShare) || !strings.Contains(err.Error(), "index 3") {
			t.Errorf("Combiner.%s(3, flipped share) = %v, want ErrBadShare naming index 3", name, err)
		}
	}
	if got := c.Indices(); len(got) != 0 {
		t.Errorf("Combiner accepted %v after refusing a flipped share, want nothing", got)
	}
}

// TestRecoverSkipsFailingSafes (RELIABILITY row 6 c, at the library level):
// a safe that cannot give its share (closed: its HSM went away; a tampered
// record; a safe holding no share of this genesis) is skipped, and the key is
// recovered from the quorum that works. The report names every skipped safe
// with its error, in the order given. When the working safes fall below the
// quorum, the recovery fails with ErrThresholdNotMet and the error of every
// failed safe, and returns no key.
func TestRecoverSkipsFailingSafes(t *testing.T) {
	ctx := context.Background()
	w := newRecoverWorld(t)
	stranger := openFileSafe(t, t.TempDir(), "stranger")
	// safe-2's device is gone: every call returns ErrClosed.
	if err := w.safes[1].Close(); err != nil {
		t.Fatal(err)
	}
	w.flipStoredByte(t, 4)
	given := []safe.Safe{w.safes[0], w.safes[1], stranger, w.safes[2], w.safes[3], w.safes[4]}

	rmk, rep, err := safe.RecoverReport(ctx, w.m, given)
	if err != nil {
		t.Fatalf("RecoverReport(safe-2 closed, stranger, safe-4 tampered; 3 good) = %v, want the key", err)
	}
	if !rmk.Equal(w.rmk) {
		t.Errorf("RecoverReport returned another key")
	}
	rmk.Wipe()
	if !slices.Equal(rep.Used, []uint32{1, 3, 5}) || !slices.Equal(rep.Accepted, []uint32{1, 3, 5}) {
		t.Errorf("report used %v, accepted %v; want [1 3 5] for both", rep.Used, rep.Accepted)
	}
	wantFailed := []struct {
		label string
		index uint32
		err   error
	}{{"safe-2", 2, safe.ErrClosed}, {"stranger", 0, nil}, {"safe-4", 4, safe.ErrTampered}}
	if len(rep.Failed) != len(wantFailed) {
		t.Fatalf("report failed = %v, want %d entries", rep.Failed, len(wantFailed))
	}
	for i, want := range wantFailed {
		got := rep.Failed[i]
		if got.Label != want.label || got.Index != want.index || (want.err != nil && !errors.Is(got, want.err)) {
			t.Errorf("failed[%d] = %s %d %v, want %s %d %v", i, got.Label, got.Index, got.Err, want.label, want.index, want.err)
		}
		if !strings.Contains(got.Error(), want.label) {
			t.Errorf("failed[%d] = %q, want it to name %s", i, got, want.label)
		}
	}
	if !strings.Contains(rep.Failed[1].Error(), "holds no share of genesis") {
		t.Errorf("the stranger's error = %q, want it to say it holds no share of the genesis", rep.Failed[1])
	}

	// Recover (without the report) succeeds on the same safes.
	if got, err := safe.Recover(ctx, w.m, given); err != nil || !got.Equal(w.rmk) {
		t.Errorf("Recover(same safes) = %v, want the key", err)
	}

	// One more failure and the quorum is gone: every failed safe is named.
	if err := w.safes[4].Destroy(ctx, w.ref(5)); err != nil {
		t.Fatal(err)
	}
	rmk, rep, err = safe.RecoverReport(ctx, w.m, given)
	if err == nil || !rmk.IsZero() {
		rmk.Wipe()
		t.Fatalf("RecoverReport(2 of 3 working) = a key, want threshold not met")
	}
	for _, want := range []error{safe.ErrThresholdNotMet, safe.ErrClosed, safe.ErrTampered, safe.ErrNotFound} {
		if !errors.Is(err, want) {
			t.Errorf("RecoverReport(2 of 3 working) = %v, want it to wrap %v", err, want)
		}
	}
	for _, s := range []string{"(2/3)", "share 2 from safe-2", "stranger", "share 4 from safe-4", "share 5 from safe-5"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("RecoverReport(2 of 3 working) = %q, want it to name %q", err, s)
		}
	}
	if len(rep.Failed) != 4 || len(rep.Used) != 0 || !slices.Equal(rep.Accepted, []uint32{1, 3}) {
		t.Errorf("report failed %d, used %v, accepted %v; want 4 failed, none used, [1 3] accepted", len(rep.Failed), rep.Used, rep.Accepted)
	}

	// A cancelled recovery is the caller's doing, not a broken safe: it
	// returns the context's error.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := safe.Recover(cctx, w.m, given); !errors.Is(err, context.Canceled) || errors.Is(err, safe.ErrThresholdNotMet) {
		t.Errorf("Recover(cancelled) = %v, want context.Canceled and not a threshold error", err)
	}
}

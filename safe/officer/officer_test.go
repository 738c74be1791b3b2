package officer_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func fileSafes(t *testing.T, n int) []safe.Safe {
	t.Helper()
	dir := t.TempDir()
	var out []safe.Safe
	for i := range n {
		s, err := safe.OpenFileSafe(safe.FileSafeConfig{
			Dir: filepath.Join(dir, fmt.Sprint(i)), Label: fmt.Sprintf("safe-%d", i+1), Passphrase: secret.New([]byte("drill passphrase")),
			KDFMemoryKiB: 8 * 1024, AttemptDir: filepath.Join(dir, "attempts"),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		out = append(out, s)
	}
	return out
}

func TestDrill(t *testing.T) {
	ctx := context.Background()
	safes := fileSafes(t, 5)
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: safes,
		Officers: []string{"spiffe://prod.example/officer/global/a", "spiffe://prod.example/officer/global/b", "spiffe://prod.example/officer/global/c", "spiffe://prod.example/officer/global/d", "spiffe://prod.example/officer/global/e"}})
	if err != nil {
		t.Fatal(err)
	}
	defer rmk.Wipe()

	r, err := officer.Drill(ctx, m, []safe.Safe{safes[4], safes[1], safes[2]}, nil)
	if err != nil {
		t.Fatalf("Drill = %v", err)
	}
	if r.GenesisID != m.GetGenesisId() || string(r.KCV) != string(m.GetKcv()) || fmt.Sprint(r.Shares) != "[5 2 3]" {
		t.Errorf("Drill report = %+v, want genesis %s, the manifest KCV, shares [5 2 3]", r, m.GetGenesisId())
	}

	// Too few safes, or safes of another genesis, fail the drill.
	if _, err := officer.Drill(ctx, m, safes[:2], nil); err == nil {
		t.Errorf("Drill with 2 of 3 safes = nil error")
	}
	other := fileSafes(t, 3)
	if _, _, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: other}); err != nil {
		t.Fatal(err)
	}
	_, err = officer.Drill(ctx, m, other, nil)
	if err == nil || !errors.Is(err, safe.ErrNotFound) && !errors.Is(err, safe.ErrBadShare) {
		// The other safes' labels collide with this manifest's, but they
		// hold no share of this genesis.
		t.Errorf("Drill with another genesis's safes = %v, want a not-found or bad-share error", err)
	}
}

package officer_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/secret"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
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

// TestDrillRefusesBadOfficers: a manifest that binds a share to an officer
// no real ceremony could accept (not a full SPIFFE ID, as the allowlists
// write them, or named for two shares) fails the drill, naming the entry,
// as it fails every real ceremony.
func TestDrillRefusesBadOfficers(t *testing.T) {
	ctx := context.Background()
	safes := fileSafes(t, 3)
	good, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: safes,
		Officers: []string{"spiffe://prod.example/officer/global/a", "spiffe://prod.example/officer/global/b", "spiffe://prod.example/officer/global/c"}})
	if err != nil {
		t.Fatal(err)
	}
	rmk.Wipe()
	for _, tt := range []struct {
		name string
		mut  func(m *safev1.GenesisManifest)
		want string
	}{
		{"relative", func(m *safev1.GenesisManifest) {
			for _, s := range m.GetSlots() {
				s.Officer = strings.TrimPrefix(s.GetOfficer(), "spiffe://prod.example/")
			}
		}, `officer "officer/global/a" of share 1 is not a full SPIFFE ID`},
		{"named twice", func(m *safev1.GenesisManifest) { m.Slots[1].Officer = m.Slots[0].GetOfficer() },
			"officer spiffe://prod.example/officer/global/a is named for shares 1 and 2"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := proto.CloneOf(good)
			tt.mut(m)
			r, err := officer.Drill(ctx, m, safes, nil)
			if !errors.Is(err, safe.ErrInvalidManifest) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Drill with officers %s = %+v, %v; want ErrInvalidManifest containing %q", tt.name, r, err, tt.want)
			}
		})
	}
}

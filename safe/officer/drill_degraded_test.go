package officer_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

// TestDrillSkipsDeadSafes (RELIABILITY row 6 c, for restore drills): a drill
// given five safes of a 3-of-5 genesis, two of them dead (closed, as when
// the HSM went away; and one whose share was destroyed), still passes on the
// three that work. The report and the log name both dead safes and their
// share indices. With a third safe dead the drill fails, naming all three.
func TestDrillSkipsDeadSafes(t *testing.T) {
	ctx := context.Background()
	safes := fileSafes(t, 5)
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: safes})
	if err != nil {
		t.Fatal(err)
	}
	rmk.Wipe()
	ref := func(i uint32) safe.ShareRef {
		return safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: i}
	}
	if err := safes[0].Close(); err != nil {
		t.Fatal(err)
	}
	if err := safes[2].Destroy(ctx, ref(3)); err != nil {
		t.Fatal(err)
	}

	var logs bytes.Buffer
	r, err := officer.Drill(ctx, m, safes, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("Drill(safe-1 closed, safe-3 without its share, 3 working) = %v, want it to pass", err)
	}
	if fmt.Sprint(r.Shares) != "[2 4 5]" || string(r.KCV) != string(m.GetKcv()) {
		t.Errorf("Drill report shares %v, KCV %x; want [2 4 5] and the manifest KCV", r.Shares, r.KCV)
	}
	if len(r.Failed) != 2 || r.Failed[0].Label != "safe-1" || r.Failed[0].Index != 1 || !errors.Is(r.Failed[0], safe.ErrClosed) ||
		r.Failed[1].Label != "safe-3" || r.Failed[1].Index != 3 || !errors.Is(r.Failed[1], safe.ErrNotFound) {
		t.Errorf("Drill report failed = %v, want safe-1 (share 1, ErrClosed) and safe-3 (share 3, ErrNotFound)", r.Failed)
	}
	for _, want := range []string{"safe=safe-1", "safe=safe-3"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("drill log does not name %s:\n%s", want, logs.String())
		}
	}

	// One more dead safe and the working ones are below the threshold.
	if err := safes[4].Destroy(ctx, ref(5)); err != nil {
		t.Fatal(err)
	}
	if _, err := officer.Drill(ctx, m, safes, nil); err == nil {
		t.Errorf("Drill with 2 of 3 safes working = nil error")
	} else {
		for _, want := range []string{"share 1 from safe-1", "share 3 from safe-3", "share 5 from safe-5", "of 3 needed"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("Drill with 2 of 3 safes working = %v, want it to name %q", err, want)
			}
		}
		if !errors.Is(err, safe.ErrClosed) || !errors.Is(err, safe.ErrNotFound) {
			t.Errorf("Drill with 2 of 3 safes working = %v, want it to wrap ErrClosed and ErrNotFound", err)
		}
	}
}

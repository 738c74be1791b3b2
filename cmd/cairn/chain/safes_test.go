package chain

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/cairnkms/cairn/safe/safeconfig"
)

// TestSoftHSMSafesOpenByHand makes the SoftHSM2 safes as `cairn up` does and
// opens each from its config alone, as an officer running bin/safe by hand
// would: SOFTHSM2_CONF in the environment points elsewhere, and the config's
// softhsm2_conf names the state dir's softhsm2.conf.
func TestSoftHSMSafesOpenByHand(t *testing.T) {
	hsm := findSoftHSM()
	if hsm == nil {
		t.Fatal("SoftHSM2 is not installed: run `make deps` (apt-get install softhsm2)")
	}
	dir := t.TempDir()
	c := &Chain{s: settings{StateDir: dir, Safes: SafesSoftHSM}, layout: layout{dir}, out: io.Discard, log: slog.New(slog.DiscardHandler), hsm: hsm}
	if _, err := c.makeSoftHSMSafes(t.Context()); err != nil {
		t.Fatalf("makeSoftHSMSafes() = %v", err)
	}
	t.Setenv("SOFTHSM2_CONF", filepath.Join(t.TempDir(), "elsewhere.conf"))
	conf := filepath.Join(dir, "softhsm", "softhsm2.conf")
	for i := 1; i <= numSafes; i++ {
		path := c.layout.safeConfig(i)
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var fields map[string]any
		if err := json.Unmarshal(raw, &fields); err != nil {
			t.Fatal(err)
		}
		if fields["softhsm2_conf"] != conf {
			t.Errorf("%s: softhsm2_conf = %v, want %s", path, fields["softhsm2_conf"], conf)
		}
		s, err := safeconfig.OpenFile(t.Context(), path)
		if err != nil {
			t.Fatalf("safeconfig.OpenFile(%s) with SOFTHSM2_CONF elsewhere = %v", path, err)
		}
		refs, err := s.List(t.Context())
		if want := fmt.Sprintf("safe-%d", i); s.Label() != want || s.Kind() != "pkcs11" || err != nil || len(refs) != 0 {
			t.Errorf("safe %d: %s (%s), List() = %v, %v; want %s pkcs11 holding no share yet", i, s.Label(), s.Kind(), refs, err, want)
		}
		s.Close()
	}
}

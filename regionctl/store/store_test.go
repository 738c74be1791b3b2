package store_test

import (
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	"github.com/cairnkms/cairn/regionctl/store"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// copies makes a real keyset encrypted for each region under a fresh region
// key version 1.
func copies(t *testing.T, name string, regions ...string) []*cryptov1.EncryptedKeyset {
	t.Helper()
	h, err := keysets.Generate("")
	if err != nil {
		t.Fatal(err)
	}
	var out []*cryptov1.EncryptedKeyset
	for _, r := range regions {
		rk, err := keysets.NewRegionKey()
		if err != nil {
			t.Fatal(err)
		}
		aead, err := keysets.RegionAEAD(rk)
		rk.Wipe()
		if err != nil {
			t.Fatal(err)
		}
		ek, err := keysets.Encrypt(h, name, r, 1, aead)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ek)
	}
	return out
}

func open(t *testing.T) *store.Store {
	t.Helper()
	s, err := store.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatalf("Open() = %v", err)
	}
	return s
}

func TestRoundTrip(t *testing.T) {
	s := open(t)
	ledger := copies(t, "payments/ledger", "us-east", "eu-west")
	index := copies(t, "search/index/v2", "us-east")
	for name, c := range map[string][]*cryptov1.EncryptedKeyset{"payments/ledger": ledger, "search/index/v2": index} {
		if err := s.Put(name, c); err != nil {
			t.Fatalf("Put(%s) = %v", name, err)
		}
	}
	got, err := s.Get("payments/ledger")
	if err != nil {
		t.Fatalf("Get(payments/ledger) = %v", err)
	}
	if diff := cmp.Diff(ledger, got, protocmp.Transform()); diff != "" {
		t.Errorf("Get(payments/ledger) (-want +got):\n%s", diff)
	}
	names, err := s.List()
	if err != nil {
		t.Fatalf("List() = %v", err)
	}
	if diff := cmp.Diff([]string{"payments/ledger", "search/index/v2"}, names); diff != "" {
		t.Errorf("List() (-want +got):\n%s", diff)
	}
	// The file is where the format says, mode 0600, and readable protojson.
	path := filepath.Join(s.Dir(), "search__index__v2.json")
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("stat %s = %v", path, err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("mode of %s = %v, want 0600", path, got)
	}
	data, _ := os.ReadFile(path)
	// protojson varies its whitespace on purpose: match the field, not the bytes.
	if !regexp.MustCompile(`"regionKeyVersion":\s*1\b`).Match(data) {
		t.Errorf("%s = %s, want protojson with regionKeyVersion", path, data)
	}
	// Only the entries: no temporary files left behind.
	entries, _ := os.ReadDir(s.Dir())
	if len(entries) != 2 {
		t.Errorf("store dir holds %d entries, want 2", len(entries))
	}
}

func TestPutNeverReplaces(t *testing.T) {
	s := open(t)
	first := copies(t, "payments/ledger", "us-east")
	if err := s.Put("payments/ledger", first); err != nil {
		t.Fatal(err)
	}
	if err := s.Put("payments/ledger", copies(t, "payments/ledger", "us-east")); !errors.Is(err, store.ErrExists) {
		t.Errorf("Put(existing) = %v, want ErrExists", err)
	}
	got, err := s.Get("payments/ledger")
	if err != nil || !proto.Equal(got[0], first[0]) {
		t.Errorf("Get() after a refused Put = %v; want the first keyset unchanged", err)
	}
	// "a__b/c" and "a/b__c" share a file name: the second is refused, and
	// Get of it does not return the first.
	if err := s.Put("a__b/c", copies(t, "a__b/c", "us-east")); err != nil {
		t.Fatal(err)
	}
	if err := s.Put("a/b__c", copies(t, "a/b__c", "us-east")); !errors.Is(err, store.ErrExists) || !strings.Contains(err.Error(), "collides") {
		t.Errorf("Put(colliding name) = %v, want ErrExists naming the collision", err)
	}
	if got, err := s.Get("a/b__c"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Get(colliding name) = %v, %v; want ErrNotFound", got, err)
	}
}

func TestPutRefuses(t *testing.T) {
	good := copies(t, "payments/ledger", "us-east", "eu-west")
	other := copies(t, "payments/ledger", "ap-south")
	clone := func(mutate func([]*cryptov1.EncryptedKeyset) []*cryptov1.EncryptedKeyset) []*cryptov1.EncryptedKeyset {
		var c []*cryptov1.EncryptedKeyset
		for _, x := range good {
			c = append(c, proto.CloneOf(x))
		}
		return mutate(c)
	}
	tests := []struct {
		name   string
		keyset string
		copies []*cryptov1.EncryptedKeyset
		want   string
	}{
		{"invalid name", "Payments/Ledger", good, "use lowercase segments"},
		{"no copies", "payments/ledger", nil, "no region copies"},
		{"copy of another keyset", "payments/refunds", good, `copy 0 is of keyset "payments/ledger"`},
		{"invalid region", "payments/ledger", clone(func(c []*cryptov1.EncryptedKeyset) []*cryptov1.EncryptedKeyset {
			c[1].Region = "EU"
			return c
		}), `invalid region "EU"`},
		{"region twice", "payments/ledger", clone(func(c []*cryptov1.EncryptedKeyset) []*cryptov1.EncryptedKeyset {
			return append(c, proto.CloneOf(c[0]))
		}), `two copies for region "us-east"`},
		{"no ciphertext", "payments/ledger", clone(func(c []*cryptov1.EncryptedKeyset) []*cryptov1.EncryptedKeyset {
			c[0].Ciphertext = nil
			return c
		}), "no ciphertext"},
		{"primary not among versions", "payments/ledger", clone(func(c []*cryptov1.EncryptedKeyset) []*cryptov1.EncryptedKeyset {
			c[0].PrimaryKeyId++
			return c
		}), "is not among its versions"},
		{"copies of different keysets", "payments/ledger", append(clone(func(c []*cryptov1.EncryptedKeyset) []*cryptov1.EncryptedKeyset { return c }), other...), "hold different keys"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t)
			err := s.Put(tt.keyset, tt.copies)
			if !errors.Is(err, store.ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Put(%s) = %v, want ErrInvalid containing %q", tt.name, err, tt.want)
			}
			if names, _ := s.List(); len(names) != 0 {
				t.Errorf("List() after a refused Put = %v, want none", names)
			}
		})
	}
}

func TestGetAndListRefuseBadFiles(t *testing.T) {
	good := copies(t, "payments/ledger", "us-east")
	tests := []struct {
		name, file, data string
		wantGet, wantAll error
	}{
		{"not JSON", "payments__ledger.json", "nope", store.ErrInvalid, store.ErrInvalid},
		{"unknown field", "payments__ledger.json", `{"keysets":[],"extra":1}`, store.ErrInvalid, store.ErrInvalid},
		{"empty", "payments__ledger.json", `{}`, store.ErrInvalid, store.ErrInvalid},
		{"another keyset's entry under this name", "payments__ledger.json",
			`{"keysets":[{"name":"payments/refunds","region":"us-east","ciphertext":"AA==","versions":[{"keyId":1}],"primaryKeyId":1}]}`, store.ErrNotFound, store.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t)
			if err := s.Put("search/index", copies(t, "search/index", "us-east")); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(s.Dir(), tt.file), []byte(tt.data), 0o600); err != nil {
				t.Fatal(err)
			}
			if got, err := s.Get("payments/ledger"); !errors.Is(err, tt.wantGet) {
				t.Errorf("Get() = %v, %v; want %v", got, err, tt.wantGet)
			}
			if got, err := s.List(); !errors.Is(err, tt.wantAll) {
				t.Errorf("List() = %v, %v; want %v", got, err, tt.wantAll)
			}
		})
	}
	s := open(t)
	if got, err := s.Get("payments/ledger"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Get(never stored) = %v, %v; want ErrNotFound", got, err)
	}
	if got, err := s.Get("../etc/passwd"); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("Get(../etc/passwd) = %v, %v; want ErrInvalid", got, err)
	}
	if err := s.Put("payments/ledger", good); err != nil {
		t.Errorf("Put() after refused reads = %v, want nil", err)
	}
	if _, err := store.Open(""); err == nil {
		t.Errorf("Open(\"\") = nil error, want an error")
	}
}

func TestForRegionAndRegions(t *testing.T) {
	c := copies(t, "payments/ledger", "us-east", "eu-west")
	if got := store.Regions(c); !cmp.Equal(got, []string{"us-east", "eu-west"}) {
		t.Errorf("Regions() = %v, want [us-east eu-west]", got)
	}
	if got := store.ForRegion(c, "eu-west"); got != c[1] {
		t.Errorf("ForRegion(eu-west) = %v, want the second copy", got)
	}
	if got := store.ForRegion(c, "ap-south"); got != nil {
		t.Errorf("ForRegion(ap-south) = %v, want nil", got)
	}
}

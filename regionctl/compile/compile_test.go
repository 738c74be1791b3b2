package compile_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	"github.com/cairnkms/cairn/regionctl/bundle"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
	"github.com/cairnkms/cairn/regionctl/store"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const createdBy = "spiffe://cairn.test/regionctl/global/regionctl"

var at = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// fakeStore maps keyset names to copies; broken names fail to read.
type fakeStore struct {
	copies map[string][]*cryptov1.EncryptedKeyset
	broken map[string]bool
}

func (s fakeStore) Get(name string) ([]*cryptov1.EncryptedKeyset, error) {
	if s.broken[name] {
		return nil, fmt.Errorf("%w: %s is corrupt", store.ErrInvalid, name)
	}
	c, ok := s.copies[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s", store.ErrNotFound, name)
	}
	return c, nil
}

// stored makes region copies (fake ciphertext: compile never decrypts).
func stored(name string, version uint32, regions ...string) []*cryptov1.EncryptedKeyset {
	var out []*cryptov1.EncryptedKeyset
	for _, r := range regions {
		out = append(out, &cryptov1.EncryptedKeyset{Name: name, Region: r, RegionKeyVersion: version, Ciphertext: []byte("wrapped " + name + " " + r),
			Versions: []*cryptov1.KeyVersionInfo{{KeyId: 42, Status: cryptov1.KeyStatus_KEY_STATUS_PRIMARY}}, PrimaryKeyId: 42})
	}
	return out
}

func ks(name string, regions ...string) config.Keyset {
	team, _, _ := strings.Cut(name, "/")
	return config.Keyset{Name: name, Team: team, Regions: regions, Purpose: config.PurposeEnvelope,
		RotationPeriod: 24 * time.Hour, CiphertextTTL: 48 * time.Hour,
		ACL: config.ACL{Encrypt: []string{"client/us-east/*"}, Decrypt: []string{"client/*/*"}}}
}

func teams(keysets ...config.Keyset) []*config.Team {
	byTeam := map[string]*config.Team{}
	var out []*config.Team
	for _, k := range keysets {
		t, ok := byTeam[k.Team]
		if !ok {
			t = &config.Team{Name: k.Team}
			byTeam[k.Team] = t
			out = append(out, t)
		}
		t.Keysets = append(t.Keysets, k)
	}
	return out
}

func want(name string, version uint32, regions ...string) *bundlev1.KeysetConfig {
	team, _, _ := strings.Cut(name, "/")
	return &bundlev1.KeysetConfig{Name: name, OwnerTeam: team, Purpose: bundlev1.Purpose_PURPOSE_ENVELOPE,
		Keyset:         stored(name, version, "us-east")[0],
		Acl:            &bundlev1.Acl{Encrypt: []string{"client/us-east/*"}, Decrypt: []string{"client/*/*"}},
		RotationPeriod: durationpb.New(24 * time.Hour), CiphertextTtl: durationpb.New(48 * time.Hour), Regions: regions}
}

func TestCompile(t *testing.T) {
	tests := []struct {
		name         string
		teams        []*config.Team
		store        fakeStore
		wantKeysets  []*bundlev1.KeysetConfig
		wantVersions []uint32
		wantMissing  []compile.Missing
		wantWarnings []string
	}{
		{
			name:  "keysets of every team, sorted by name; other regions' keysets left out",
			teams: teams(ks("search/index", "us-east"), ks("payments/ledger", "us-east", "eu-west"), ks("payments/eu-only", "eu-west"), ks("ads/clicks", "us-east")),
			store: fakeStore{copies: map[string][]*cryptov1.EncryptedKeyset{
				"search/index": stored("search/index", 1, "us-east"), "payments/ledger": stored("payments/ledger", 1, "us-east", "eu-west"),
				"payments/eu-only": stored("payments/eu-only", 1, "eu-west"), "ads/clicks": stored("ads/clicks", 1, "us-east"),
			}},
			wantKeysets:  []*bundlev1.KeysetConfig{want("ads/clicks", 1, "us-east"), want("payments/ledger", 1, "eu-west", "us-east"), want("search/index", 1, "us-east")},
			wantVersions: []uint32{1},
		},
		{
			name:  "distinct region key versions, sorted",
			teams: teams(ks("a/one", "us-east"), ks("a/two", "us-east"), ks("a/three", "us-east")),
			store: fakeStore{copies: map[string][]*cryptov1.EncryptedKeyset{
				"a/one": stored("a/one", 3, "us-east"), "a/two": stored("a/two", 1, "us-east"), "a/three": stored("a/three", 3, "us-east"),
			}},
			wantKeysets:  []*bundlev1.KeysetConfig{want("a/one", 3, "us-east"), want("a/three", 3, "us-east"), want("a/two", 1, "us-east")},
			wantVersions: []uint32{1, 3},
		},
		{
			name:  "configured but not stored, or stored without this region",
			teams: teams(ks("a/new", "us-east"), ks("a/moved", "us-east", "eu-west"), ks("a/ok", "us-east")),
			store: fakeStore{copies: map[string][]*cryptov1.EncryptedKeyset{
				"a/moved": stored("a/moved", 1, "eu-west"), "a/ok": stored("a/ok", 1, "us-east"),
			}},
			wantKeysets:  []*bundlev1.KeysetConfig{want("a/ok", 1, "us-east")},
			wantVersions: []uint32{1},
			wantMissing: []compile.Missing{
				{Keyset: "a/moved", Team: "a", Reason: "the store holds copies for [eu-west] only; adding a region to an existing keyset is not supported yet"},
				{Keyset: "a/new", Team: "a", Reason: "not in the store (run regionctl keyset create)"},
			},
		},
		{
			name:         "a region dropped from the config stays in the keyset's regions",
			teams:        teams(ks("a/one", "us-east")),
			store:        fakeStore{copies: map[string][]*cryptov1.EncryptedKeyset{"a/one": stored("a/one", 1, "us-east", "eu-west")}},
			wantKeysets:  []*bundlev1.KeysetConfig{want("a/one", 1, "eu-west", "us-east")},
			wantVersions: []uint32{1},
			wantWarnings: []string{"keyset a/one: configured for [us-east] but stored for [eu-west us-east]; the bundle lists [eu-west us-east]"},
		},
		{
			name:  "nothing for the region: a valid empty bundle",
			teams: teams(ks("a/one", "eu-west")),
			store: fakeStore{copies: map[string][]*cryptov1.EncryptedKeyset{"a/one": stored("a/one", 1, "eu-west")}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := compile.Compile(compile.Input{Region: "us-east", Serial: 5, CreatedBy: createdBy, CreatedAt: at, Teams: tt.teams, Store: tt.store})
			if err != nil {
				t.Fatalf("Compile() = %v", err)
			}
			wantBundle := &bundlev1.Bundle{FormatVersion: 1, Region: "us-east", Serial: 5, RegionKeyVersions: tt.wantVersions,
				CreatedAt: timestamppb.New(at), CreatedBy: createdBy, Keysets: tt.wantKeysets}
			if diff := cmp.Diff(wantBundle, res.Bundle, protocmp.Transform()); diff != "" {
				t.Errorf("Compile().Bundle (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantMissing, res.Missing); diff != "" {
				t.Errorf("Compile().Missing (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantWarnings, res.Warnings); diff != "" {
				t.Errorf("Compile().Warnings (-want +got):\n%s", diff)
			}
			if err := bundle.Validate(res.Bundle); err != nil {
				t.Errorf("Validate(Compile().Bundle) = %v", err)
			}
		})
	}
}

func TestCompileFails(t *testing.T) {
	ok := fakeStore{copies: map[string][]*cryptov1.EncryptedKeyset{"a/one": stored("a/one", 1, "us-east")}}
	tests := []struct {
		name string
		in   compile.Input
		want error
	}{
		{"unreadable store entry", compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, Teams: teams(ks("a/one", "us-east")),
			Store: fakeStore{broken: map[string]bool{"a/one": true}}}, store.ErrInvalid},
		{"serial 0", compile.Input{Region: "us-east", Serial: 0, CreatedBy: createdBy, Teams: teams(ks("a/one", "us-east")), Store: ok}, bundle.ErrInvalid},
		{"no author", compile.Input{Region: "us-east", Serial: 1, Teams: teams(ks("a/one", "us-east")), Store: ok}, bundle.ErrInvalid},
		{"invalid region", compile.Input{Region: "US", Serial: 1, CreatedBy: createdBy, Store: ok}, bundle.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if res, err := compile.Compile(tt.in); !errors.Is(err, tt.want) {
				t.Errorf("Compile(%s) = %v, %v; want %v", tt.name, res, err, tt.want)
			}
		})
	}
}

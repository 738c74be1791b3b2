package compile_test

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const createdBy = "spiffe://cairn.test/regionctl/global/regionctl"

var at = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func team(name string, ks ...config.Keyset) *config.Team {
	for i := range ks {
		ks[i].Team = name
		ks[i].Purpose = config.PurposeEnvelope
	}
	return &config.Team{Name: name, Keysets: ks}
}

func rec(name string, regions []string, ttl, rotation time.Duration, versions ...*statev1.KeysetVersionRecord) *statev1.KeysetRecord {
	r := &statev1.KeysetRecord{Name: name, Regions: regions, RotationPeriod: durationpb.New(rotation),
		TtlHistory: []*statev1.TtlPeriod{{Ttl: durationpb.New(ttl), From: timestamppb.New(at)}}, Versions: versions}
	for _, region := range regions {
		c := &cryptov1.EncryptedKeyset{Name: name, Region: region, RegionKeyVersion: 2, Ciphertext: []byte("x")}
		for _, v := range versions {
			st := cryptov1.KeyStatus_KEY_STATUS_ENABLED
			if v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY {
				st, c.PrimaryKeyId = cryptov1.KeyStatus_KEY_STATUS_PRIMARY, v.GetKeyId()
			}
			c.Versions = append(c.Versions, &cryptov1.KeyVersionInfo{KeyId: v.GetKeyId(), Status: st})
		}
		r.Copies = append(r.Copies, c)
	}
	return r
}

func TestCompileProblems(t *testing.T) {
	teams := []*config.Team{team("pay",
		config.Keyset{Name: "pay/a", Regions: []string{"us-east"}, CiphertextTTL: time.Hour, RotationPeriod: 2 * time.Hour},
		config.Keyset{Name: "pay/missing", Regions: []string{"us-east"}, CiphertextTTL: time.Hour, RotationPeriod: time.Hour},
		config.Keyset{Name: "pay/ttl", Regions: []string{"us-east"}, CiphertextTTL: 3 * time.Hour, RotationPeriod: time.Hour},
		config.Keyset{Name: "pay/regions", Regions: []string{"us-east", "eu-west"}, CiphertextTTL: time.Hour, RotationPeriod: time.Hour},
	)}
	primary := &statev1.KeysetVersionRecord{KeyId: 1, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY}
	record := []*statev1.KeysetRecord{
		rec("pay/a", []string{"us-east"}, time.Hour, 2*time.Hour, primary),
		rec("pay/ttl", []string{"us-east"}, time.Hour, time.Hour, primary),
		rec("pay/regions", []string{"us-east"}, time.Hour, time.Hour, primary),
		rec("other/orphan", []string{"us-east"}, time.Hour, time.Hour, primary),
		rec("other/elsewhere", []string{"eu-west"}, time.Hour, time.Hour, primary),
	}
	res, err := compile.Compile(compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, CreatedAt: at, Teams: teams, Record: record, Window: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if res.Bundle != nil {
		t.Errorf("Compile with problems made a bundle")
	}
	var got []string
	for _, p := range res.Problems {
		got = append(got, p.String())
	}
	for _, want := range []string{
		"keyset other/orphan: the record serves it in us-east, but no valid team file lists it",
		"keyset pay/missing (team pay): not in the root KMS record",
		"keyset pay/regions (team pay): configured for [eu-west us-east] but the record has [us-east]",
		"keyset pay/ttl (team pay): ciphertext_ttl is 3h0m0s in the team file but 1h0m0s in the record; run regionctl keyset set-policy pay/ttl --ttl 3h0m0s",
	} {
		if !strings.Contains(strings.Join(got, "\n"), want) {
			t.Errorf("Compile problems = %q, want one containing %q", got, want)
		}
	}
	if len(got) != 4 {
		t.Errorf("Compile problems = %d (%q), want 4", len(got), got)
	}
}

// TestCompilePartial: with AllowPartial the keysets with problems are left
// out and recorded, one entry per keyset, with the reason and the builder.
func TestCompilePartial(t *testing.T) {
	teams := []*config.Team{team("pay",
		config.Keyset{Name: "pay/a", Regions: []string{"us-east"}, CiphertextTTL: time.Hour, RotationPeriod: 2 * time.Hour},
		config.Keyset{Name: "pay/missing", Regions: []string{"us-east"}, CiphertextTTL: time.Hour, RotationPeriod: time.Hour},
		config.Keyset{Name: "pay/ttl", Regions: []string{"us-east"}, CiphertextTTL: 3 * time.Hour, RotationPeriod: 2 * time.Hour},
	)}
	primary := &statev1.KeysetVersionRecord{KeyId: 1, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY}
	record := []*statev1.KeysetRecord{
		rec("pay/a", []string{"us-east"}, time.Hour, 2*time.Hour, primary),
		rec("pay/ttl", []string{"us-east"}, time.Hour, time.Hour, primary),
		rec("other/orphan", []string{"us-east"}, time.Hour, time.Hour, primary),
	}
	in := compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, CreatedAt: at, Teams: teams, Record: record, Window: time.Minute, AllowPartial: true}
	if _, err := compile.Compile(in); err == nil || !strings.Contains(err.Error(), "a partial build needs a reason") {
		t.Errorf("Compile(AllowPartial, no reason) = %v, want an error", err)
	}
	in.PartialReason = "INC-9: the pay team fixes pay/ttl tomorrow"
	res, err := compile.Compile(in)
	if err != nil || len(res.Problems) != 0 || res.Bundle == nil {
		t.Fatalf("Compile(AllowPartial) = %v, %v; want a bundle", res, err)
	}
	var names []string
	for _, k := range res.Bundle.GetKeysets() {
		names = append(names, k.GetName())
	}
	if !cmp.Equal(names, []string{"pay/a"}) {
		t.Errorf("partial bundle keysets = %v, want [pay/a]", names)
	}
	p := res.Bundle.GetPartial()
	wantLeft := []string{
		"other/orphan: the record serves it in us-east, but no valid team file lists it for us-east (a keyset is never silently dropped)",
		"pay/missing: (team pay) not in the root KMS record for us-east (run regionctl keyset create)",
		"pay/ttl: (team pay) ciphertext_ttl is 3h0m0s in the team file but 1h0m0s in the record; run regionctl keyset set-policy pay/ttl --ttl 3h0m0s (or fix the file); " +
			"(team pay) rotation_period is 2h0m0s in the team file but 1h0m0s in the record; run regionctl keyset set-policy pay/ttl --rotation-period 2h0m0s (or fix the file)",
	}
	if p.GetReason() != in.PartialReason || p.GetBuiltBy() != createdBy || !cmp.Equal(p.GetLeftOut(), wantLeft) {
		t.Errorf("partial = %v, want reason %q, built_by %s, left_out %q", p, in.PartialReason, createdBy, wantLeft)
	}
	if len(res.LeftOut) != 4 {
		t.Errorf("LeftOut = %v, want the 4 keyset problems", res.LeftOut)
	}

	// Nothing to leave out: a whole bundle, no partial record.
	in.Teams, in.Record = teams[:0], nil
	res, err = compile.Compile(in)
	if err != nil || res.Bundle == nil || res.Bundle.GetPartial() != nil {
		t.Errorf("Compile(AllowPartial, nothing to leave out) = %v, %v; want a bundle without a partial record", res, err)
	}
}

func TestLifecycle(t *testing.T) {
	t1, t2 := timestamppb.New(at), timestamppb.New(at.Add(time.Hour))
	v := &statev1.KeysetVersionRecord{KeyId: 5, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED,
		Propagated: []*statev1.RegionTime{{Region: "eu-west", At: t2}, {Region: "us-east", At: t1}}}
	half := &statev1.KeysetVersionRecord{KeyId: 6, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED,
		Propagated: []*statev1.RegionTime{{Region: "us-east", At: t1}}}
	p := &statev1.KeysetVersionRecord{KeyId: 4, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY, PrimarySince: t1}
	r := rec("pay/a", []string{"eu-west", "us-east"}, time.Hour, time.Hour, p, v, half)
	got := compile.Lifecycle(r, r.GetCopies()[0])
	if len(got) != 3 || got[0].GetPrimarySince() == nil || !got[1].GetPropagatedEverywhere().AsTime().Equal(t2.AsTime()) || got[2].GetPropagatedEverywhere() != nil {
		t.Errorf("Lifecycle = %v; want primary_since on 4, propagated_everywhere = the later region on 5, none on 6", got)
	}
	teams := []*config.Team{team("pay", config.Keyset{Name: "pay/a", Regions: []string{"us-east", "eu-west"}, CiphertextTTL: time.Hour, RotationPeriod: time.Hour})}
	res, err := compile.Compile(compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, CreatedAt: at, Teams: teams, Record: []*statev1.KeysetRecord{r}, Window: time.Minute})
	if err != nil || len(res.Problems) != 0 {
		t.Fatalf("Compile = %v, %v", res, err)
	}
	k := res.Bundle.GetKeysets()[0]
	if !cmp.Equal(res.Bundle.GetRegionKeyVersions(), []uint32{2}) || k.GetCiphertextTtl().AsDuration() != time.Hour || len(k.GetTtlHistory()) != 1 || k.GetPropagationWindow().AsDuration() != time.Minute {
		t.Errorf("bundle = %v", res.Bundle)
	}
}

// TestCompileNotAfter: the bundle's not_after is created_at plus ValidFor,
// bundle.DefaultValidity when it is 0; a validity past bundle.MaxValidity
// or negative is refused.
func TestCompileNotAfter(t *testing.T) {
	tests := []struct {
		name     string
		validFor time.Duration
		want     time.Time // zero: refused
	}{
		{"default", 0, at.Add(bundle.DefaultValidity)},
		{"a week", 7 * 24 * time.Hour, at.Add(7 * 24 * time.Hour)},
		{"the most", bundle.MaxValidity, at.Add(bundle.MaxValidity)},
		{"too long", bundle.MaxValidity + time.Second, time.Time{}},
		{"negative", -time.Hour, time.Time{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := compile.Compile(compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, CreatedAt: at, ValidFor: tt.validFor, Window: time.Minute})
			if tt.want.IsZero() {
				if err == nil {
					t.Fatalf("Compile(ValidFor %v) = %v, want an error", tt.validFor, res.Bundle.GetNotAfter().AsTime())
				}
				return
			}
			if err != nil {
				t.Fatalf("Compile(ValidFor %v) = %v", tt.validFor, err)
			}
			if got := res.Bundle.GetNotAfter().AsTime(); !got.Equal(tt.want) {
				t.Errorf("Compile(ValidFor %v).not_after = %v, want %v", tt.validFor, got, tt.want)
			}
			if err := bundle.Validate(res.Bundle); err != nil {
				t.Errorf("Validate(compiled) = %v", err)
			}
		})
	}
}

// TestDestroyed: the bundle names, sorted, the versions the record
// destroyed within bundle.DestroyedRetention of its created_at, and neither
// older destructions, versions only scheduled for destruction, nor versions
// the copy still holds.
func TestDestroyed(t *testing.T) {
	destroyed := func(id uint32, ago time.Duration) *statev1.KeysetVersionRecord {
		return &statev1.KeysetVersionRecord{KeyId: id, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED,
			DestroyedAt: timestamppb.New(at.Add(-ago))}
	}
	p := &statev1.KeysetVersionRecord{KeyId: 4, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY}
	scheduled := &statev1.KeysetVersionRecord{KeyId: 3, State: statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED}
	r := rec("pay/a", []string{"us-east"}, time.Hour, time.Hour, p, scheduled)
	r.Versions = append(r.Versions, destroyed(9, time.Hour), destroyed(2, bundle.DestroyedRetention), destroyed(1, bundle.DestroyedRetention+time.Second))
	if got, want := compile.Destroyed(r, r.GetCopies()[0], at), []uint32{2, 9}; !cmp.Equal(got, want) {
		t.Errorf("Destroyed = %v, want %v", got, want)
	}
	// The record and the copy disagree: the copy holds it, so it is served,
	// not named destroyed.
	held := rec("pay/b", []string{"us-east"}, time.Hour, time.Hour, p, destroyed(5, time.Minute))
	if got := compile.Destroyed(held, held.GetCopies()[0], at); len(got) != 0 {
		t.Errorf("Destroyed(a version the copy holds) = %v, want none", got)
	}
	teams := []*config.Team{team("pay", config.Keyset{Name: "pay/a", Regions: []string{"us-east"}, CiphertextTTL: time.Hour, RotationPeriod: time.Hour})}
	res, err := compile.Compile(compile.Input{Region: "us-east", Serial: 1, CreatedBy: createdBy, CreatedAt: at, Teams: teams, Record: []*statev1.KeysetRecord{r}, Window: time.Minute})
	if err != nil || len(res.Problems) != 0 {
		t.Fatalf("Compile = %v, %v", res, err)
	}
	if got := res.Bundle.GetKeysets()[0].GetDestroyedKeyIds(); !cmp.Equal(got, []uint32{2, 9}) {
		t.Errorf("bundle destroyed_key_ids = %v, want [2 9]", got)
	}
}

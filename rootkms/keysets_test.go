package rootkms_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/keysets"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

// keysetCall runs one keyset RPC through the cluster client.
func keysetCall(t *testing.T, cl *rootkmsclient.Client, f func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error)) (*rootkmsv1.Keyset, error) {
	t.Helper()
	var out *rootkmsv1.Keyset
	err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		var err error
		out, err = f(ctx, c)
		return err
	})
	return out, err
}

func step(name string, s statev1.KeysetStep, keyID uint32) func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
	return func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return c.UpdateKeyset(ctx, &rootkmsv1.UpdateKeysetRequest{Name: name, Step: s, KeyId: keyID})
	}
}

func versionOf(k *rootkmsv1.Keyset, keyID uint32) *statev1.KeysetVersionRecord {
	for _, v := range k.GetRecord().GetVersions() {
		if v.GetKeyId() == keyID {
			return v
		}
	}
	return nil
}

// observe records that every server of region serves the keyset's versions
// and last used them at lastUse (zero: never).
func observe(t *testing.T, cl *rootkmsclient.Client, region, name string, lastUse time.Time, keyIDs ...uint32) {
	t.Helper()
	obs := &statev1.KeysetObservation{Keyset: name}
	for _, id := range keyIDs {
		v := &statev1.VersionObservation{KeyId: id, ServedByAll: true}
		if !lastUse.IsZero() {
			v.LastEncrypt, v.LastUse = timestamppb.New(lastUse), timestamppb.New(lastUse)
		}
		obs.Versions = append(obs.Versions, v)
	}
	if err := cl.Do(bg(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		_, err := c.RecordPropagation(ctx, &rootkmsv1.RecordPropagationRequest{Region: region, Keysets: []*statev1.KeysetObservation{obs}, RegionKeyVersions: []uint32{1}})
		return err
	}); err != nil {
		t.Fatalf("RecordPropagation(%s) = %v", region, err)
	}
}

// TestKeysetLifecycle drives one keyset through the record: create (a name
// is never reused), add a version, promote only once every region served it
// for the window, disable the old primary only after its TTL, schedule and
// undo destruction, destroy, rewrap; every refusal names what is in the way
// and changes nothing.
func TestKeysetLifecycle(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	admin := c.client(regionctlID, r1.api)
	createRegion(t, admin, "us-east")
	createRegion(t, admin, "eu-west")
	const name = "payments/ledger"
	ttl := 2 * time.Hour
	create := func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: name, Regions: []string{"us-east", "eu-west"},
			CiphertextTtl: durationpb.New(ttl), RotationPeriod: durationpb.New(24 * time.Hour)})
	}
	ks, err := keysetCall(t, admin, create)
	if err != nil {
		t.Fatalf("CreateKeyset = %v", err)
	}
	rec := ks.GetRecord()
	if len(rec.GetVersions()) != 1 || rec.GetVersions()[0].GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY || len(rec.GetCopies()) != 2 || rec.GetRevision() != 1 {
		t.Fatalf("CreateKeyset = %v, want one primary version, two copies, revision 1", rec)
	}
	first := rec.GetVersions()[0].GetKeyId()
	// A name is never reused: the old keys would be lost to every ciphertext.
	if _, err := keysetCall(t, admin, create); status.Code(err) != codes.AlreadyExists {
		t.Errorf("CreateKeyset(existing) = %v, want AlreadyExists", err)
	}
	for _, bad := range []*rootkmsv1.CreateKeysetRequest{
		{Name: "Bad Name", Regions: []string{"us-east"}, CiphertextTtl: durationpb.New(time.Hour)},
		{Name: "x/y", CiphertextTtl: durationpb.New(time.Hour)},
		{Name: "x/y", Regions: []string{"us-east", "us-east"}, CiphertextTtl: durationpb.New(time.Hour)},
		{Name: "x/y", Regions: []string{"us-east"}},
		{Name: "x/y", Regions: []string{"us-east"}, CiphertextTtl: durationpb.New(-time.Hour)},
		{Name: "x/y", Regions: []string{"us-east"}, CiphertextTtl: durationpb.New(time.Hour), Template: "NOPE"},
	} {
		if _, err := keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
			return cl.CreateKeyset(ctx, bad)
		}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateKeyset(%v) = %v, want InvalidArgument", bad, err)
		}
	}
	if _, err := keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: "x/y", Regions: []string{"ap-south"}, CiphertextTtl: durationpb.New(time.Hour)})
	}); status.Code(err) != codes.NotFound {
		t.Errorf("CreateKeyset(unknown region) = %v, want NotFound", err)
	}

	// Add a version: decrypt-only.
	ks, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_ADD_VERSION, 0))
	if err != nil {
		t.Fatalf("ADD_VERSION = %v", err)
	}
	if len(ks.GetRecord().GetVersions()) != 2 {
		t.Fatalf("after ADD_VERSION: %v", ks.GetRecord().GetVersions())
	}
	second := ks.GetRecord().GetVersions()[1].GetKeyId()
	if v := versionOf(ks, second); v.GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED {
		t.Fatalf("new version state = %v, want ENABLED", v.GetState())
	}

	// Promote before any region served it: refused, naming both regions.
	_, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, second))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "us-east") || !strings.Contains(err.Error(), "eu-west") {
		t.Fatalf("PROMOTE before propagation = %v, want FailedPrecondition naming us-east and eu-west", err)
	}
	// One region serves it: still refused, naming the other.
	observe(t, admin, "us-east", name, time.Time{}, first, second)
	_, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, second))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "eu-west") {
		t.Fatalf("PROMOTE with eu-west not propagated = %v, want FailedPrecondition naming eu-west", err)
	}
	// Both regions, but not yet for the window: refused with the earliest
	// safe time.
	observe(t, admin, "eu-west", name, time.Time{}, first, second)
	_, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, second))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "earliest safe time") {
		t.Fatalf("PROMOTE within the window = %v, want FailedPrecondition with the earliest safe time", err)
	}
	got, err := keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: name})
	})
	if err != nil || versionOf(got, first).GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY {
		t.Fatalf("after refused promotions: %v, %v; want the first version still primary", got, err)
	}
	// Past the window the observations are stale: usage and serving since
	// then are unknown, and unknown counts as in use.
	c.Advance(testWindow + time.Second)
	if _, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, second)); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "unknown") {
		t.Fatalf("PROMOTE on stale observations = %v, want FailedPrecondition (usage unknown)", err)
	}
	observe(t, admin, "us-east", name, time.Time{}, first, second)
	observe(t, admin, "eu-west", name, time.Time{}, first, second)
	ks, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, second))
	if err != nil {
		t.Fatalf("PROMOTE after the window = %v", err)
	}
	if versionOf(ks, second).GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY || versionOf(ks, first).GetSupersededAt() == nil {
		t.Fatalf("after PROMOTE: %v", ks.GetRecord().GetVersions())
	}
	// Promoting the primary again changes nothing; an unknown version is
	// NotFound.
	if again, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_PROMOTE, second)); err != nil || again.GetRecord().GetRevision() != ks.GetRecord().GetRevision() {
		t.Errorf("PROMOTE(the primary) = %v, %v; want the record unchanged at revision %d", again.GetRecord().GetRevision(), err, ks.GetRecord().GetRevision())
	}
	for _, s := range []statev1.KeysetStep{statev1.KeysetStep_KEYSET_STEP_ENABLE, statev1.KeysetStep_KEYSET_STEP_DESTROY, statev1.KeysetStep_KEYSET_STEP_PROMOTE} {
		if _, err := keysetCall(t, admin, step(name, s, 42)); status.Code(err) != codes.NotFound {
			t.Errorf("%v of an unknown version = %v, want NotFound", s, err)
		}
	}

	// The old primary cannot leave the decrypt set within its TTL, nor while
	// a region's usage is unknown (observation too old).
	observe(t, admin, "us-east", name, c.now(), first, second)
	observe(t, admin, "eu-west", name, time.Time{}, first, second)
	_, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_DISABLE, first))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "earliest safe time") {
		t.Fatalf("DISABLE within the TTL = %v, want FailedPrecondition with the earliest safe time", err)
	}
	c.Advance(ttl + 2*testWindow)
	_, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_DISABLE, first))
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DISABLE with stale usage observations = %v, want FailedPrecondition (unknown usage counts as in use)", err)
	}
	// A region still serving the old primary as primary (held back from the
	// promotion, or rolled back from it) may encrypt with it at any moment,
	// however long it has not: it keeps it, whatever the record's times.
	observe(t, admin, "us-east", name, time.Time{}, first, second)
	if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.RecordPropagation(ctx, &rootkmsv1.RecordPropagationRequest{Region: "eu-west", RegionKeyVersions: []uint32{1},
			Keysets: []*statev1.KeysetObservation{{Keyset: name, Versions: []*statev1.VersionObservation{
				{KeyId: first, ServedByAll: true, ServedAsPrimary: true}, {KeyId: second, ServedByAll: true}}}}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	_, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_DISABLE, first))
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "eu-west") || !strings.Contains(err.Error(), "serves it as primary") {
		t.Fatalf("DISABLE while eu-west serves it as primary = %v, want FailedPrecondition naming eu-west", err)
	}
	observe(t, admin, "eu-west", name, time.Time{}, first, second)
	ks, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_DISABLE, first))
	if err != nil {
		t.Fatalf("DISABLE after TTL + window with fresh observations = %v", err)
	}
	// The primary can never be disabled.
	if _, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_DISABLE, second)); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("DISABLE(primary) = %v, want FailedPrecondition", err)
	}

	// Destroy with a delay, undo, schedule again, destroy once due.
	if _, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, first)); err != nil {
		t.Fatalf("SCHEDULE_DESTROY = %v", err)
	}
	if _, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_DESTROY, first)); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("DESTROY before destroy_after = %v, want FailedPrecondition", err)
	}
	if ks, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_UNDESTROY, first)); err != nil || versionOf(ks, first).GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED {
		t.Fatalf("UNDESTROY = %v, %v; want DISABLED", ks, err)
	}
	if _, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, first)); err != nil {
		t.Fatalf("SCHEDULE_DESTROY = %v", err)
	}
	c.Advance(25 * time.Hour)
	if ks, err = keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_DESTROY, first)); err != nil || versionOf(ks, first).GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED {
		t.Fatalf("DESTROY when due = %v, %v; want DESTROYED", ks, err)
	}

	// Rewrap under a rotated region key; the key material is wiped from
	// every copy and the copies still open.
	if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: "us-east"})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_REWRAP, 0)); err != nil {
		t.Fatalf("REWRAP = %v", err)
	}
	ks, err = keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: name, IncludeCopies: true})
	})
	if err != nil {
		t.Fatal(err)
	}
	east := ks.GetRecord().GetCopies()[1]
	if east.GetRegion() != "us-east" || east.GetRegionKeyVersion() != 2 {
		t.Fatalf("us-east copy after REWRAP = %v under %d, want us-east under 2", east.GetRegion(), east.GetRegionKeyVersion())
	}
	mat, err := c.unwrap(kmsEast, r1.api, "us-east")
	if err != nil {
		t.Fatal(err)
	}
	h, err := keysets.Decrypt(east, live.AEADsOf(t, mat)[2])
	if err != nil {
		t.Fatalf("decrypting the rewrapped copy = %v", err)
	}
	if info := h.KeysetInfo(); len(info.GetKeyInfo()) != 1 || info.GetPrimaryKeyId() != second {
		t.Errorf("rewrapped copy holds %v, want only the second version as primary", info)
	}

	// The old region key version retires only once no copy and no served
	// bundle needs it.
	retire := func() error {
		return admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.RetireRegionKeyVersion(ctx, &rootkmsv1.RetireRegionKeyVersionRequest{Region: "us-east", Version: 1})
			return err
		})
	}
	if err := retire(); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "last seen") {
		t.Errorf("RetireRegionKeyVersion while the servers need it = %v, want FailedPrecondition", err)
	}
	if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.RecordPropagation(ctx, &rootkmsv1.RecordPropagationRequest{Region: "us-east", RegionKeyVersions: []uint32{2}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := retire(); err != nil {
		t.Errorf("RetireRegionKeyVersion once nothing needs it = %v", err)
	}
	// An observation of keysets must say which region keys the servers
	// need; servers serving a bundle without keysets need none.
	record := func(req *rootkmsv1.RecordPropagationRequest) error {
		return admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.RecordPropagation(ctx, req)
			return err
		})
	}
	if err := record(&rootkmsv1.RecordPropagationRequest{Region: "eu-west", Keysets: []*statev1.KeysetObservation{{Keyset: name}}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("RecordPropagation(keysets, no region key versions) = %v, want InvalidArgument", err)
	}
	if err := record(&rootkmsv1.RecordPropagationRequest{Region: "eu-west"}); err != nil {
		t.Errorf("RecordPropagation(an empty bundle's region) = %v, want nil", err)
	}
	scanNoSecrets(t, c, []*replica{r1})
}

// TestListKeysetsPages: ListKeysets pages through the record in name order,
// each keyset once, within the region asked for.
func TestListKeysetsPages(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	admin := c.client(regionctlID, r1.api)
	createRegion(t, admin, "us-east")
	createRegion(t, admin, "eu-west")
	var want, wantEast []string
	for i := range 5 {
		name := fmt.Sprintf("team/k%d", i)
		regions := []string{"eu-west"}
		if i%2 == 0 {
			regions = append(regions, "us-east")
			wantEast = append(wantEast, name)
		}
		want = append(want, name)
		if _, err := keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
			return cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: name, Regions: regions, CiphertextTtl: durationpb.New(time.Hour)})
		}); err != nil {
			t.Fatal(err)
		}
	}
	list := func(region string, size uint32) (names []string, pages int) {
		for token := ""; ; {
			var resp *rootkmsv1.ListKeysetsResponse
			if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) (err error) {
				resp, err = cl.ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{Region: region, IncludeCopies: true, PageSize: size, PageToken: token})
				return err
			}); err != nil {
				t.Fatalf("ListKeysets(%q, page %q) = %v", region, token, err)
			}
			if len(resp.GetKeysets()) > int(size) {
				t.Errorf("ListKeysets(page_size %d) listed %d", size, len(resp.GetKeysets()))
			}
			if resp.GetPropagationWindow().AsDuration() != testWindow {
				t.Errorf("ListKeysets window = %v, want %v", resp.GetPropagationWindow().AsDuration(), testWindow)
			}
			pages++
			for _, k := range resp.GetKeysets() {
				names = append(names, k.GetRecord().GetName())
			}
			if token = resp.GetNextPageToken(); token == "" {
				return names, pages
			}
		}
	}
	if got, pages := list("", 2); !slices.Equal(got, want) || pages != 3 {
		t.Errorf("ListKeysets by 2 = %v in %d pages, want %v in 3", got, pages, want)
	}
	if got, _ := list("us-east", 1); !slices.Equal(got, wantEast) {
		t.Errorf("ListKeysets(us-east) by 1 = %v, want %v", got, wantEast)
	}
	err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		_, err := cl.ListKeysets(ctx, &rootkmsv1.ListKeysetsRequest{PageSize: rootkms.MaxListPageSize + 1})
		return err
	})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("ListKeysets(page_size above the maximum) = %v, want InvalidArgument", err)
	}
}

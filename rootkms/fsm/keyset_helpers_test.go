package fsm_test

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/keysets"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
)

const (
	ksEnabled          = statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED
	ksPrimary          = statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY
	ksDisabled         = statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED
	ksDestroyScheduled = statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED
	ksDestroyed        = statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROYED

	stepAdd             = statev1.KeysetStep_KEYSET_STEP_ADD_VERSION
	stepPromote         = statev1.KeysetStep_KEYSET_STEP_PROMOTE
	stepDisable         = statev1.KeysetStep_KEYSET_STEP_DISABLE
	stepEnable          = statev1.KeysetStep_KEYSET_STEP_ENABLE
	stepScheduleDestroy = statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY
	stepUndestroy       = statev1.KeysetStep_KEYSET_STEP_UNDESTROY
	stepDestroy         = statev1.KeysetStep_KEYSET_STEP_DESTROY
	stepRewrap          = statev1.KeysetStep_KEYSET_STEP_REWRAP
)

// regionAEADs are test region key AEADs, by region, made on first use. The
// FSM never decrypts copies, so they need not match the wrapped test keys.
var regionAEADs = struct {
	sync.Mutex
	m map[string]tink.AEAD
}{m: map[string]tink.AEAD{}}

func regionAEAD(t testing.TB, region string) tink.AEAD {
	t.Helper()
	regionAEADs.Lock()
	defer regionAEADs.Unlock()
	if a, ok := regionAEADs.m[region]; ok {
		return a
	}
	k, err := keysets.NewRegionKey()
	if err != nil {
		t.Fatalf("NewRegionKey() = %v", err)
	}
	defer k.Wipe()
	a, err := keysets.RegionAEAD(k)
	if err != nil {
		t.Fatalf("RegionAEAD() = %v", err)
	}
	regionAEADs.m[region] = a
	return a
}

// tinkKeyset is a real customer keyset the tests change in step with the
// commands they propose, as the root KMS leader does.
type tinkKeyset struct {
	t    testing.TB
	name string
	m    *keyset.Manager
}

// newTinkKeyset makes keyset name with one primary key and returns it with
// that key's ID.
func newTinkKeyset(t testing.TB, name string) (*tinkKeyset, uint32) {
	t.Helper()
	h, err := keysets.Generate("")
	if err != nil {
		t.Fatalf("Generate() = %v", err)
	}
	return &tinkKeyset{t: t, name: name, m: keyset.NewManagerFromHandle(h)}, h.KeysetInfo().GetPrimaryKeyId()
}

// add adds a key and returns its ID.
func (k *tinkKeyset) add() uint32 {
	k.t.Helper()
	tmpl, _ := keysets.Template("")
	id, err := k.m.Add(tmpl)
	if err != nil {
		k.t.Fatalf("Add() = %v", err)
	}
	return id
}

// step mirrors an update_keyset step in the Tink keyset.
func (k *tinkKeyset) step(step statev1.KeysetStep, id uint32) {
	k.t.Helper()
	var err error
	switch step {
	case stepPromote:
		err = k.m.SetPrimary(id)
	case stepDisable:
		err = k.m.Disable(id)
	case stepEnable:
		err = k.m.Enable(id)
	case stepDestroy:
		err = k.m.Delete(id)
	}
	if err != nil {
		k.t.Fatalf("%v(%d) = %v", step, id, err)
	}
}

// copies encrypts the keyset for each region under the given region key
// version, in the order given (sorted, for a valid command).
func (k *tinkKeyset) copies(regions []string, versions map[string]uint32) []*cryptov1.EncryptedKeyset {
	k.t.Helper()
	h, err := k.m.Handle()
	if err != nil {
		k.t.Fatalf("Handle() = %v", err)
	}
	var out []*cryptov1.EncryptedKeyset
	for _, r := range regions {
		c, err := keysets.Encrypt(h, k.name, r, versions[r], regionAEAD(k.t, r))
		if err != nil {
			k.t.Fatalf("Encrypt() = %v", err)
		}
		out = append(out, c)
	}
	return out
}

// usable is the region key version the tests encrypt copies under: PRIMARY
// in euSetup.
var usable = map[string]uint32{"eu": 2, "us": 1}

var euUS = []string{"eu", "us"}

func ts(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }

func dur(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

func keysetCommand(at time.Time) *statev1.Command {
	return &statev1.Command{FormatVersion: fsm.FormatVersion, Time: timestamppb.New(at)}
}

// createKeysetRecord returns the record of a valid create_keyset command.
func createKeysetRecord(name string, regions []string, keyID uint32, copies []*cryptov1.EncryptedKeyset) *statev1.KeysetRecord {
	return &statev1.KeysetRecord{
		Name:           name,
		Regions:        regions,
		CreatedBy:      "spiffe://cairn.test/regionctl/ops",
		RotationPeriod: dur(90 * 24 * time.Hour),
		TtlHistory:     []*statev1.TtlPeriod{{Ttl: dur(24 * time.Hour)}},
		Versions:       []*statev1.KeysetVersionRecord{{KeyId: keyID, State: ksPrimary, Template: "AES256_GCM"}},
		Copies:         copies,
		Revision:       1,
		Purpose:        1,
	}
}

func createKeyset(rec *statev1.KeysetRecord, at time.Time) *statev1.Command {
	c := keysetCommand(at)
	c.Op = &statev1.Command_CreateKeyset{CreateKeyset: &statev1.CreateKeysetCommand{Keyset: rec}}
	return c
}

func updateKeyset(name string, rev uint64, step statev1.KeysetStep, id uint32, copies []*cryptov1.EncryptedKeyset, at time.Time) *statev1.Command {
	c := keysetCommand(at)
	u := &statev1.UpdateKeysetCommand{Name: name, ExpectedRevision: rev, Step: step, KeyId: id, Copies: copies}
	if step == stepAdd {
		u.Template = "AES256_GCM"
	}
	c.Op = &statev1.Command_UpdateKeyset{UpdateKeyset: u}
	return c
}

func setPolicy(name string, rev uint64, rotation, ttl *durationpb.Duration, at time.Time) *statev1.Command {
	c := keysetCommand(at)
	c.Op = &statev1.Command_SetKeysetPolicy{SetKeysetPolicy: &statev1.SetKeysetPolicyCommand{
		Name: name, ExpectedRevision: rev, RotationPeriod: rotation, CiphertextTtl: ttl,
	}}
	return c
}

func recordPropagation(region string, served []uint32, obs []*statev1.KeysetObservation, at time.Time) *statev1.Command {
	c := keysetCommand(at)
	c.Op = &statev1.Command_RecordPropagation{RecordPropagation: &statev1.RecordPropagationCommand{
		Region: region, ObservedAt: ts(at), Keysets: obs, RegionKeyVersions: served,
	}}
	return c
}

// fakeGolden is a golden ciphertext the FSM accepts for key id: the
// ciphertext starts with id's TINK prefix. The FSM never decrypts it.
func fakeGolden(id uint32) *statev1.GoldenCiphertext {
	ct := binary.BigEndian.AppendUint32([]byte{1}, id)
	ct = append(ct, "golden-ciphertext"...)
	sum := sha256.Sum256(ct)
	return &statev1.GoldenCiphertext{Ciphertext: ct, AssociatedData: []byte(fmt.Sprintf("cairn/golden/v1\x00%d", id)), PlaintextSha256: sum[:]}
}

// withRequest returns cmd carrying identity and request ID id.
func withRequest(cmd *statev1.Command, identity, id string) *statev1.Command {
	cmd.Identity, cmd.RequestId = identity, id
	return cmd
}

// fakeCopies returns copies of keyset name whose public metadata matches
// versions, with stand-in ciphertexts: enough for the FSM, which never
// decrypts, and cheap enough for the generator.
func fakeCopies(name string, regions []string, versions []*statev1.KeysetVersionRecord, regionKey map[string]uint32) []*cryptov1.EncryptedKeyset {
	var out []*cryptov1.EncryptedKeyset
	for _, r := range regions {
		c := &cryptov1.EncryptedKeyset{Name: name, Region: r, RegionKeyVersion: regionKey[r], Ciphertext: []byte("ciphertext:" + name + ":" + r)}
		for _, v := range versions {
			st := map[statev1.KeysetVersionState]cryptov1.KeyStatus{
				ksEnabled: enabled, ksPrimary: primary, ksDisabled: disabled, ksDestroyScheduled: disabled,
			}
			s, ok := st[v.GetState()]
			if !ok {
				continue
			}
			if s == primary {
				c.PrimaryKeyId = v.GetKeyId()
			}
			c.Versions = append(c.Versions, &cryptov1.KeyVersionInfo{KeyId: v.GetKeyId(), Status: s, TypeUrl: "type.googleapis.com/google.crypto.tink.AesGcmKey"})
		}
		out = append(out, c)
	}
	return out
}

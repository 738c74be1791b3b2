package fsm

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// fillFields sets every field of m to a non-zero value of its kind: lists
// and maps get one element, messages a new empty one. A field added to the
// message later is therefore set too.
func fillFields(t *testing.T, m protoreflect.Message) {
	t.Helper()
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		switch {
		case fd.IsList():
			l := m.Mutable(fd).List()
			if fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind {
				l.Append(protoreflect.ValueOfMessage(l.NewElement().Message()))
			} else {
				l.Append(scalar(t, fd))
			}
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			k := scalar(t, fd.MapKey()).MapKey()
			if v := fd.MapValue(); v.Kind() == protoreflect.MessageKind {
				mp.Set(k, protoreflect.ValueOfMessage(mp.NewValue().Message()))
			} else {
				mp.Set(k, scalar(t, v))
			}
		case fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind:
			m.Set(fd, protoreflect.ValueOfMessage(m.NewField(fd).Message()))
		default:
			m.Set(fd, scalar(t, fd))
		}
	}
	for i := range fields.Len() {
		if fd := fields.Get(i); !m.Has(fd) {
			t.Fatalf("fillFields: field %s is not set (in a oneof?)", fd.FullName())
		}
	}
}

// scalar returns a non-zero value of fd's kind.
func scalar(t *testing.T, fd protoreflect.FieldDescriptor) protoreflect.Value {
	t.Helper()
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		return protoreflect.ValueOfEnum(1)
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(7)
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(7)
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(7)
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(7)
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(7)
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(7)
	case protoreflect.StringKind:
		return protoreflect.ValueOfString("x")
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte("x"))
	}
	t.Fatalf("scalar: no value for field %s of kind %v", fd.FullName(), fd.Kind())
	return protoreflect.Value{}
}

// TestShallowCopiesCopyEveryField guards the hand-written shallow copies: a
// field added to a record and not copied makes this fail.
func TestShallowCopiesCopyEveryField(t *testing.T) {
	k := &statev1.KeysetRecord{}
	fillFields(t, k.ProtoReflect())
	if got := shallowKeyset(k); !proto.Equal(got, k) {
		t.Errorf("shallowKeyset(%v) = %v, want an equal record", k, got)
	}
	want := proto.CloneOf(k)
	want.Copies = nil
	if got := KeysetWithoutCopies(k); !proto.Equal(got, want) {
		t.Errorf("KeysetWithoutCopies(%v) = %v, want %v", k, got, want)
	}
	if len(k.GetCopies()) != 1 {
		t.Errorf("KeysetWithoutCopies changed its argument: %d copies, want 1", len(k.GetCopies()))
	}

	v := &statev1.KeysetVersionRecord{}
	fillFields(t, v.ProtoReflect())
	if got := shallowVersion(v); !proto.Equal(got, v) {
		t.Errorf("shallowVersion(%v) = %v, want an equal record", v, got)
	}
}

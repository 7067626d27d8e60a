//! The pool's bulk format for plain data: serde with fixed-width little-endian integers.
//!
//! Chunks of a `map` are large arrays of small values; `postcard`'s varints cost several
//! nanoseconds per item on each side, which is most of the time of a `map(x*x)`. This format
//! writes each integer as its fixed-width bytes (lengths and enum tags as `u32`), so a
//! `Vec<u64>` costs about a copy. It is not self-describing and carries no descriptors: a value
//! holding a handle fails to encode here (its `serialize_fd` finds no capture), and the pool
//! then uses the crate's codec for that chunk (`Payload` tag in `worker.rs`).

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};

/// The format's error: a message.
#[derive(Debug)]
pub(crate) struct WireError(String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for WireError {}
impl ser::Error for WireError {
    fn custom<T: std::fmt::Display>(m: T) -> Self {
        WireError(m.to_string())
    }
}
impl de::Error for WireError {
    fn custom<T: std::fmt::Display>(m: T) -> Self {
        WireError(m.to_string())
    }
}

type R<T> = std::result::Result<T, WireError>;

/// Appends `v` to `out`.
pub(crate) fn to_vec_into<T: Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) -> R<()> {
    v.serialize(&mut Ser { out })
}

/// Reads a `T` that must use all of `b`.
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(b: &'de [u8]) -> R<T> {
    let mut d = De { b };
    let v = T::deserialize(&mut d)?;
    if !d.b.is_empty() {
        return Err(WireError("trailing bytes".into()));
    }
    Ok(v)
}

struct Ser<'a> {
    out: &'a mut Vec<u8>,
}

impl Ser<'_> {
    #[inline]
    fn len(&mut self, n: usize) -> R<()> {
        let n = u32::try_from(n).map_err(|_| WireError("length above u32".into()))?;
        self.out.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }
}

macro_rules! ser_num {
    ($name:ident, $t:ty) => {
        #[inline]
        fn $name(self, v: $t) -> R<()> {
            self.out.extend_from_slice(&v.to_le_bytes());
            Ok(())
        }
    };
}

impl<'a, 'b> ser::Serializer for &'a mut Ser<'b> {
    type Ok = ();
    type Error = WireError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    #[inline]
    fn serialize_bool(self, v: bool) -> R<()> {
        self.out.push(v as u8);
        Ok(())
    }
    ser_num!(serialize_i8, i8);
    ser_num!(serialize_i16, i16);
    ser_num!(serialize_i32, i32);
    ser_num!(serialize_i64, i64);
    ser_num!(serialize_i128, i128);
    ser_num!(serialize_u8, u8);
    ser_num!(serialize_u16, u16);
    ser_num!(serialize_u32, u32);
    ser_num!(serialize_u64, u64);
    ser_num!(serialize_u128, u128);
    ser_num!(serialize_f32, f32);
    ser_num!(serialize_f64, f64);
    fn serialize_char(self, v: char) -> R<()> {
        self.serialize_u32(v as u32)
    }
    fn serialize_str(self, v: &str) -> R<()> {
        self.len(v.len())?;
        self.out.extend_from_slice(v.as_bytes());
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> R<()> {
        self.len(v.len())?;
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> R<()> {
        self.out.push(0);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> R<()> {
        self.out.push(1);
        v.serialize(self)
    }
    fn serialize_unit(self) -> R<()> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R<()> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, i: u32, _: &'static str) -> R<()> {
        self.serialize_u32(i)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R<()> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        i: u32,
        _: &'static str,
        v: &T,
    ) -> R<()> {
        self.serialize_u32(i)?;
        v.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> R<Self> {
        let n = len.ok_or_else(|| WireError("sequence of unknown length".into()))?;
        self.len(n)?;
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> R<Self> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> R<Self> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        i: u32,
        _: &'static str,
        _: usize,
    ) -> R<Self> {
        self.serialize_u32(i)?;
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> R<Self> {
        let n = len.ok_or_else(|| WireError("map of unknown length".into()))?;
        self.len(n)?;
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> R<Self> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        i: u32,
        _: &'static str,
        _: usize,
    ) -> R<Self> {
        self.serialize_u32(i)?;
        Ok(self)
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

macro_rules! compound {
    ($tr:ident, $m:ident) => {
        impl ser::$tr for &mut Ser<'_> {
            type Ok = ();
            type Error = WireError;
            #[inline]
            fn $m<T: Serialize + ?Sized>(&mut self, v: &T) -> R<()> {
                v.serialize(&mut **self)
            }
            fn end(self) -> R<()> {
                Ok(())
            }
        }
    };
}
compound!(SerializeSeq, serialize_element);
compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);

impl ser::SerializeMap for &mut Ser<'_> {
    type Ok = ();
    type Error = WireError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> R<()> {
        k.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> R<()> {
        v.serialize(&mut **self)
    }
    fn end(self) -> R<()> {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Ser<'_> {
    type Ok = ();
    type Error = WireError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R<()> {
        v.serialize(&mut **self)
    }
    fn end(self) -> R<()> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Ser<'_> {
    type Ok = ();
    type Error = WireError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R<()> {
        v.serialize(&mut **self)
    }
    fn end(self) -> R<()> {
        Ok(())
    }
}

/// A reader over wire bytes, for decoding a sequence one item at a time.
pub(crate) struct De<'de> {
    b: &'de [u8],
}

impl<'de> De<'de> {
    /// A reader over `b`.
    pub(crate) fn new(b: &'de [u8]) -> Self {
        De { b }
    }

    /// Reads a sequence's length prefix.
    pub(crate) fn seq_len(&mut self) -> R<usize> {
        self.len()
    }

    /// Reads one value.
    pub(crate) fn read<T: de::Deserialize<'de>>(&mut self) -> R<T> {
        T::deserialize(self)
    }

    /// Whether all input was used.
    pub(crate) fn is_done(&self) -> bool {
        self.b.is_empty()
    }

    #[inline]
    fn take<const N: usize>(&mut self) -> R<[u8; N]> {
        if self.b.len() < N {
            return Err(WireError("unexpected end of input".into()));
        }
        let (h, t) = self.b.split_at(N);
        self.b = t;
        Ok(h.try_into().expect("N bytes"))
    }
    #[inline]
    fn len(&mut self) -> R<usize> {
        Ok(u32::from_le_bytes(self.take::<4>()?) as usize)
    }
    fn bytes(&mut self) -> R<&'de [u8]> {
        let n = self.len()?;
        if self.b.len() < n {
            return Err(WireError("unexpected end of input".into()));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
}

macro_rules! de_num {
    ($name:ident, $visit:ident, $t:ty) => {
        #[inline]
        fn $name<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
            v.$visit(<$t>::from_le_bytes(self.take()?))
        }
    };
}

impl<'de> de::Deserializer<'de> for &mut De<'de> {
    type Error = WireError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> R<V::Value> {
        Err(WireError(
            "the pool's wire format is not self-describing".into(),
        ))
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        match self.take::<1>()?[0] {
            0 => v.visit_bool(false),
            1 => v.visit_bool(true),
            _ => Err(WireError("invalid bool".into())),
        }
    }
    de_num!(deserialize_i8, visit_i8, i8);
    de_num!(deserialize_i16, visit_i16, i16);
    de_num!(deserialize_i32, visit_i32, i32);
    de_num!(deserialize_i64, visit_i64, i64);
    de_num!(deserialize_i128, visit_i128, i128);
    de_num!(deserialize_u8, visit_u8, u8);
    de_num!(deserialize_u16, visit_u16, u16);
    de_num!(deserialize_u32, visit_u32, u32);
    de_num!(deserialize_u64, visit_u64, u64);
    de_num!(deserialize_u128, visit_u128, u128);
    de_num!(deserialize_f32, visit_f32, f32);
    de_num!(deserialize_f64, visit_f64, f64);
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let c = u32::from_le_bytes(self.take()?);
        v.visit_char(char::from_u32(c).ok_or_else(|| WireError("invalid char".into()))?)
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let b = self.bytes()?;
        v.visit_borrowed_str(std::str::from_utf8(b).map_err(|e| WireError(e.to_string()))?)
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        self.deserialize_str(v)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        v.visit_borrowed_bytes(self.bytes()?)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        self.deserialize_bytes(v)
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        match self.take::<1>()?[0] {
            0 => v.visit_none(),
            1 => v.visit_some(self),
            _ => Err(WireError("invalid option tag".into())),
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> R<V::Value> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> R<V::Value> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let n = self.len()?;
        v.visit_seq(Access { de: self, left: n })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, n: usize, v: V) -> R<V::Value> {
        v.visit_seq(Access { de: self, left: n })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        n: usize,
        v: V,
    ) -> R<V::Value> {
        v.visit_seq(Access { de: self, left: n })
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        let n = self.len()?;
        v.visit_map(Access { de: self, left: n })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> R<V::Value> {
        v.visit_seq(Access {
            de: self,
            left: fields.len(),
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> R<V::Value> {
        v.visit_enum(self)
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> R<V::Value> {
        self.deserialize_u32(v)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> R<V::Value> {
        Err(WireError(
            "cannot skip values in the pool's wire format".into(),
        ))
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

struct Access<'a, 'de> {
    de: &'a mut De<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Access<'_, 'de> {
    type Error = WireError;
    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, s: T) -> R<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        s.deserialize(&mut *self.de).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        // Never more than the bytes left could hold (a forged length must not allocate).
        Some(self.left.min(self.de.b.len()))
    }
}

impl<'de> de::MapAccess<'de> for Access<'_, 'de> {
    type Error = WireError;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, s: K) -> R<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        s.deserialize(&mut *self.de).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, s: V) -> R<V::Value> {
        s.deserialize(&mut *self.de)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left.min(self.de.b.len()))
    }
}

impl<'de> de::EnumAccess<'de> for &mut De<'de> {
    type Error = WireError;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, s: V) -> R<(V::Value, Self)> {
        let i = u32::from_le_bytes(self.take()?);
        let v = s.deserialize(i.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut De<'de> {
    type Error = WireError;
    fn unit_variant(self) -> R<()> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, s: T) -> R<T::Value> {
        s.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, n: usize, v: V) -> R<V::Value> {
        v.visit_seq(Access { de: self, left: n })
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> R<V::Value> {
        v.visit_seq(Access {
            de: self,
            left: fields.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    enum E {
        A,
        B(i8),
        C { x: Option<String>, y: (u16, char) },
        D(f64, Vec<u8>),
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct S {
        a: u64,
        b: i128,
        c: Vec<E>,
        d: BTreeMap<String, bool>,
        e: (),
        f: String,
    }

    #[test]
    fn round_trips_the_data_model() {
        let mut d = BTreeMap::new();
        d.insert("k".to_string(), true);
        let s = S {
            a: u64::MAX,
            b: -5,
            c: vec![
                E::A,
                E::B(-1),
                E::C {
                    x: Some("é".into()),
                    y: (7, 'ß'),
                },
                E::D(1.5, vec![1, 2]),
            ],
            d,
            e: (),
            f: String::new(),
        };
        let mut out = Vec::new();
        to_vec_into(&s, &mut out).unwrap();
        assert_eq!(from_slice::<S>(&out).unwrap(), s);
        for cut in 0..out.len() {
            assert!(from_slice::<S>(&out[..cut]).is_err());
        }
    }

    #[test]
    fn forged_length_does_not_allocate_wildly() {
        let b = u32::MAX.to_le_bytes();
        assert!(from_slice::<Vec<u64>>(&b).is_err());
    }
}
